"""``captioner serve``: a FastAPI app that captions uploaded images, with micro-batching.

| module | holds |
|---|---|
| :mod:`~captioner.serve.app` | :func:`create_app`: the app, its lifespan and error handlers |
| :mod:`~captioner.serve.routes` | the endpoints (an ``APIRouter``) and ``GET /model``'s summary |
| :mod:`~captioner.serve.requests` | a ``POST /caption`` read and checked: size, images, options |
| :mod:`~captioner.serve.limits` | :class:`BodyLimits`: a body bounded as it arrives |
| :mod:`~captioner.serve.batcher` | :class:`MicroBatcher`: concurrent requests decoded together |
| :mod:`~captioner.serve.state` | :class:`ServeState`: what the routes share (``app.state.serve``) |
| :mod:`~captioner.serve.settings` | :class:`ServeSettings`: batching and limits (torch-free) |

``static/index.html`` is the web page; the command line is :mod:`captioner.cli.serve`.
"""
