"""``captioner serve``: a FastAPI app that captions uploaded images, with micro-batching."""
