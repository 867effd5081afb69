"""Recurrent decoders: word embedding -> recurrent cell (LSTM, GRU or vanilla tanh RNN) ->
vocabulary logits, the cell's state initialised from the image.

One class per way of reading the image, chosen by ``model.decoder.attention``
(:func:`build_decoder`):

| ``attention`` | class | reads |
|---|---|---|
| ``none`` | :class:`PooledDecoder` | the pooled features [B, F], once, into the initial state |
| ``soft`` | :class:`SoftAttentionDecoder` | the grid [B, P, F] at every step ("Show, Attend and Tell", Xu et al. 2015) |
| ``topdown`` | :class:`TopDownDecoder` | the grid at every step, through a second cell (Anderson et al. 2018) |

What they share (embedding, cell, initial state, output layer, tied weights, teacher forcing,
one decoding step) is :class:`Decoder`; a new decoder is a subclass that says what its state
holds besides the cell's and what one step does.

Shapes: B batch, T caption length (with <start>/<end>), F encoder feature size, P grid positions
(h x w), A attention size, E embedding size, H hidden size, L layers, V vocabulary size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from captioner.configs.model import DecoderConfig
from captioner.models.attention import SoftAttention

# the decoder's state, every tensor with the batch in dim 1 (what beam search reorders): each
# cell's (h, c) for an LSTM or (h,) for a GRU / RNN, each [L, B, H], ``self.rnn``'s first (the
# top-down decoder has two cells); then what the decoder keeps besides, e.g. with soft attention
# the image grid [P, B, F] and its attention projection [P, B, A]
State = tuple[Tensor, ...]
Cell = tuple[Tensor, ...]  # one cell's part of the state: (h, c) or (h,)


def recurrent_cell(cfg: DecoderConfig, input_size: int) -> nn.RNNBase:
    """A ``model.decoder.cell`` of ``num_layers`` layers and ``hidden_size`` units, batch first."""
    rnn_kwargs: dict[str, Any] = {"nonlinearity": "tanh"} if cfg.cell == "rnn" else {}
    return {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cfg.cell](
        input_size,
        cfg.hidden_size,
        num_layers=cfg.num_layers,
        batch_first=True,
        dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        **rnn_kwargs,
    )


def run_cell(rnn: nn.RNNBase, x: Tensor, cell: Cell) -> tuple[Tensor, Cell]:
    """``rnn`` on one input x [B, input size] from ``cell`` -> (top hidden state [B, H], the
    new (h, c) or (h,))."""
    out, new = rnn(x.unsqueeze(1), cell if len(cell) == 2 else cell[0])  # [B, 1, H]
    return out.squeeze(1), new if isinstance(new, tuple) else (new,)


def rename_legacy_keys(state: dict[str, Any], prefix: str = "decoder.") -> dict[str, Any]:
    """Checkpoints from before the cell was configurable name the decoder's LSTM ``lstm``, now
    ``rnn``: rename ``{prefix}lstm.*`` keys in place (model weights and weight averages alike)."""
    for key in [k for k in state if k.startswith(prefix + "lstm.")]:
        state[prefix + "rnn." + key[len(prefix) + 5 :]] = state.pop(key)
    return state


class Decoder(nn.Module):
    """What every decoder shares: word embedding -> recurrent cell (LSTM, GRU or vanilla RNN) ->
    vocabulary logits, the state initialised from pooled image features [B, F] (through
    ``init_h`` / ``init_c``, or as the cell's input at t = -1 with ``feature_mode=first_input``),
    or, for a decoder that attends, zeros (``feature_mode=zeros``).

    A subclass sets ``attention_kind`` (the ``model.decoder.attention`` value it implements) and, to
    read more of the image than its initial state, overrides :meth:`_input_size`,
    :meth:`_memory` and :meth:`_advance`; one with more cells than ``self.rnn`` sets ``cells``
    and overrides :meth:`_initial_cells`. Built by :func:`build_decoder`.

    Implements the ``StepDecoder`` protocol of :mod:`captioner.decoding` (``init_state``/``step``).
    """

    attention_kind: ClassVar[str | None] = None  # the model.decoder.attention it implements
    attends: ClassVar[bool] = False  # whether steps give attention weights over the grid
    cells: ClassVar[int] = 1  # how many cells' tensors the state starts with (self.rnn's first)

    def __init__(self, feature_dim: int, vocab_size: int, cfg: DecoderConfig, pad_id: int = 0):
        if cfg.attention != self.attention_kind:
            raise ValueError(
                f"{type(self).__name__} is no decoder for model.decoder.attention="
                f"{cfg.attention}: build decoders with build_decoder"
            )
        super().__init__()
        self.cfg = cfg
        L, H, E = cfg.num_layers, cfg.hidden_size, cfg.embed_dim
        self.cell_tensors = 2 if cfg.cell == "lstm" else 1  # (h, c) or (h,)
        self.embed = nn.Embedding(vocab_size, E, padding_idx=pad_id)
        self.rnn = recurrent_cell(cfg, self._input_size(feature_dim))
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(H, vocab_size)
        if cfg.tie_weights:
            # one [V, E] matrix reads and writes words; N(0, 1) embeddings would make the initial
            # logits ~10x too large, so start it small as the PyTorch word-language-model does
            nn.init.uniform_(self.embed.weight, -0.1, 0.1)
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()
            self.out.weight = self.embed.weight
        if cfg.feature_mode == "init_state":
            self.init_h = nn.Linear(feature_dim, L * H)
            if cfg.cell == "lstm":
                self.init_c = nn.Linear(feature_dim, L * H)
        elif cfg.feature_mode == "first_input":
            self.feature_embed = nn.Linear(feature_dim, E)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        rename_legacy_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _input_size(self, feature_dim: int) -> int:
        """The cell's input size: the word embedding's (E)."""
        return self.cfg.embed_dim

    # -- state ----------------------------------------------------------------------------------
    def _cell_state(self, state: State) -> Tensor | tuple[Tensor, Tensor]:
        """What ``self.rnn`` takes: (h, c) for an LSTM, h for a GRU / RNN."""
        return (state[0], state[1]) if self.cell_tensors == 2 else state[0]

    def _with_cell(self, state: State, cell: Cell) -> State:
        """``state`` with ``self.rnn``'s tensors (its first) replaced by ``cell``."""
        return (*cell, *state[self.cell_tensors :])

    def _memory(self, features: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """features -> (pooled features [B, F] that initialise the cell, what the state keeps
        after the cell's tensors): here the features themselves, and nothing."""
        return features, ()

    def _from_image(self, pooled: Tensor, init_h: nn.Linear, init_c: nn.Linear | None) -> Cell:
        """pooled features [B, F] -> one cell's initial (h, c) or (h,), each [L, B, H]."""
        B, L, H = pooled.shape[0], self.cfg.num_layers, self.cfg.hidden_size
        h = torch.tanh(init_h(pooled)).view(B, L, H).transpose(0, 1).contiguous()
        if init_c is None:
            return (h,)
        return (h, init_c(pooled).view(B, L, H).transpose(0, 1).contiguous())

    def _initial_cells(self, pooled: Tensor) -> tuple[Tensor, ...]:
        """The cells' initial tensors from pooled features [B, F] (``feature_mode=init_state``):
        here ``self.rnn``'s."""
        return self._from_image(pooled, self.init_h, getattr(self, "init_c", None))

    def init_state(self, features: Tensor) -> State:
        """features [B, F] (or the grid [B, P, F] for a decoder that attends) -> the initial
        state."""
        B, L, H = features.shape[0], self.cfg.num_layers, self.cfg.hidden_size
        pooled, memory = self._memory(features)
        pooled = self.dropout(pooled)
        if self.cfg.feature_mode == "init_state":
            return (*self._initial_cells(pooled), *memory)
        zeros = pooled.new_zeros(L, B, H)
        state = ((zeros,) * (self.cells * self.cell_tensors)) + memory
        if self.cfg.feature_mode == "zeros":  # the image is read at each step, not in h0/c0
            return state
        # first_input: the image is the cells' input at t = -1, from a zero state
        _, state, _ = self._advance(self.feature_embed(pooled), state)
        return state

    # -- one step -------------------------------------------------------------------------------
    def _cell_step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """The cell on one input x [B, input size] -> (top hidden state [B, H], new state)."""
        out, cell = run_cell(self.rnn, x, state[: self.cell_tensors])
        return out, self._with_cell(state, cell)

    def _advance(self, x: Tensor, state: State) -> tuple[Tensor, State, Tensor | None]:
        """One time step: input x [B, E] -> (top hidden state [B, H], new state, attention
        weights [B, P] or None). The one step function of both teacher forcing and decoding."""
        out, state = self._cell_step(x, state)
        return out, state, None

    def _unroll(
        self, x: Tensor, state: State, lengths: Tensor, return_attention: bool
    ) -> tuple[Tensor, Tensor | None, State]:
        """Teacher forcing through the cell: inputs x [B, T-1, E] -> (top hidden states
        [B, T-1, H], attention weights [B, T-1, P] with the padded steps' zeroed when
        ``return_attention`` and the decoder attends, else None, the state after the last
        step). Step by step here, as the input of each step may depend on the previous one's
        state."""
        outs, alphas = [], []
        for t in range(x.shape[1]):
            o, state, a = self._advance(x[:, t], state)
            outs.append(o)
            alphas.append(a)
        out = torch.stack(outs, dim=1)  # [B, T-1, H]
        alpha = None
        if return_attention and self.attends:
            steps = torch.arange(x.shape[1], device=x.device)
            real = steps[None, :] < (lengths.to(x.device)[:, None] - 1)  # [B, T-1]
            alpha = torch.stack(alphas, dim=1) * real[:, :, None]  # [B, T-1, P]
        return out, alpha, state

    def continue_state(self, state: State, features: Tensor) -> State:
        """The state to go on from after ``state`` (one a chunk of teacher forcing ended in):
        its cells' tensors as they are, and what the state keeps of the image (the grid and its
        projection) rebuilt from ``features``, so that detaching ``state`` cuts the gradient
        through the recurrence only, not the one through the image's memory."""
        return (*state[: self.cells * self.cell_tensors], *self._memory(features)[1])

    def forward(
        self,
        features: Tensor,
        captions: Tensor,
        lengths: Tensor,
        return_attention: bool = False,
        state: State | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, ...]:
        """Teacher forcing. features [B, F] (grid [B, P, F] with attention), captions [B, T]
        (<start> .. <end> <pad>..), lengths [B] -> logits [B, T-1, V] predicting captions[:, 1:]
        (padded positions are meaningless). ``return_attention``: (logits, alpha [B, T-1, P]
        with the weights of padded steps zeroed; None without attention).

        Chunk by chunk (truncated BPTT): ``state`` is the state the previous chunk ended in
        (:meth:`continue_state`; None: the image's initial state), and ``captions`` the chunk's
        tokens with the previous chunk's last target first; ``return_state`` appends the state
        after the chunk's last step to what is returned."""
        state = self.init_state(features) if state is None else self.continue_state(state, features)
        inputs = captions[:, :-1]  # [B, T-1]: <start> w1 .. wn (and pads)
        x = self.dropout(self.embed(inputs))  # [B, T-1, E]
        out, alpha, state = self._unroll(x, state, lengths, return_attention)
        logits = self.out(self.dropout(out))  # [B, T-1, V]
        returned = (logits, alpha) if return_attention else (logits,)
        if return_state:
            returned = (*returned, state)
        return returned if len(returned) > 1 else logits

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """One decoding step: tokens [B] -> logits [B, V] and the next state. The same function as
        one position of :meth:`forward`, dropout included in train mode (self-critical training
        samples this way); in eval mode dropout is the identity."""
        out, state, _ = self._advance(self.dropout(self.embed(tokens)), state)
        return self.out(self.dropout(out)), state


class PooledDecoder(Decoder):
    """The decoder of pooled image features [B, F] (``model.decoder.attention=none``, "Show and
    Tell", Vinyals et al. 2015): the image only initialises the state; each step reads the
    previous word."""

    attention_kind = "none"

    def _unroll(
        self, x: Tensor, state: State, lengths: Tensor, return_attention: bool
    ) -> tuple[Tensor, Tensor | None, State]:
        # The padded batch goes through the cell as it is, without pack_padded_sequence: the
        # cell runs forward in time and captions are padded at the end, so a real position
        # never sees a pad, and what the pads produce is masked out of the loss. Same outputs
        # and gradients as packing, and on a CPU about 1.3x faster a step
        # (benchmarks/README.md). (So the final state of a caption that ended before the last
        # step has read pads: a next chunk only continues captions that had not ended.)
        out, last = self.rnn(x, self._cell_state(state))  # [B, T-1, H]
        return out, None, self._with_cell(state, last if isinstance(last, tuple) else (last,))


class SoftAttentionDecoder(Decoder):
    """The decoder that attends over the image grid [B, P, F] (``model.decoder.attention=soft``,
    "Show, Attend and Tell", Xu et al. 2015). The grid's mean initialises the state as pooled
    features do; each step's input is [embedding of the previous word; beta * context], the
    context attended over the grid (:class:`~captioner.models.attention.SoftAttention`) from the
    top layer's previous hidden state, gated by the scalar beta = sigmoid(W_beta h) (section
    4.2.1). The state keeps the grid [P, B, F] and its attention projection [P, B, A] after the
    cell's tensors."""

    attention_kind = "soft"
    attends = True

    def __init__(self, feature_dim: int, vocab_size: int, cfg: DecoderConfig, pad_id: int = 0):
        super().__init__(feature_dim, vocab_size, cfg, pad_id)
        self.attention = SoftAttention(feature_dim, cfg.hidden_size, cfg.attention_dim)
        self.gate = nn.Linear(cfg.hidden_size, 1)  # beta

    def _input_size(self, feature_dim: int) -> int:
        """The cell's input size: the word embedding's and the context's (E + F)."""
        return self.cfg.embed_dim + feature_dim

    def _memory(self, features: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        grid = features.transpose(0, 1)  # [P, B, F]: the batch in dim 1, as beams reorder it
        memory = (grid, self.attention.feature_proj(grid))  # [P, B, F], [P, B, A]
        return features.mean(dim=1), memory  # [B, F]

    def _advance(self, x: Tensor, state: State) -> tuple[Tensor, State, Tensor | None]:
        query = state[0][-1]  # the top layer's h_{t-1} [B, H]
        context, alpha = self.attention(state[-2], state[-1], query)  # [B, F], [B, P]
        x = torch.cat([x, torch.sigmoid(self.gate(query)) * context], dim=-1)
        out, state = self._cell_step(x, state)
        return out, state, alpha


class TopDownDecoder(Decoder):
    """The top-down attention decoder over the image grid [B, P, F]
    (``model.decoder.attention=topdown``; Anderson et al. 2018, "Bottom-Up and Top-Down
    Attention", section 3.2, over the CNN's grid rather than detected regions). Two cells per
    step: the attention cell reads [the language cell's previous top h; the grid's mean; the
    word's embedding], its top h queries an additive attention over the grid
    (:class:`~captioner.models.attention.SoftAttention`), and the language cell (``self.rnn``)
    reads [the attended context; the attention cell's top h] and predicts the word.

    Unlike the paper's zero start (``feature_mode=zeros``), the grid's mean initialises both
    cells' state by default (through ``init_h`` / ``init_c`` and ``init_attention_h`` /
    ``init_attention_c``), or, with ``feature_mode=first_input``, is the word input of a step at
    t = -1 from zero states. ``cell`` and ``num_layers`` apply to both cells (the paper's:
    one-layer LSTMs). The state is (language cell's tensors, attention cell's tensors, grid
    [P, B, F], its attention projection [P, B, A], the grid's mean [1, B, F])."""

    attention_kind = "topdown"
    attends = True
    cells = 2

    def __init__(self, feature_dim: int, vocab_size: int, cfg: DecoderConfig, pad_id: int = 0):
        super().__init__(feature_dim, vocab_size, cfg, pad_id)
        H, E, L = cfg.hidden_size, cfg.embed_dim, cfg.num_layers
        self.attention_rnn = recurrent_cell(cfg, H + feature_dim + E)
        self.attention = SoftAttention(feature_dim, H, cfg.attention_dim)
        if cfg.feature_mode == "init_state":
            self.init_attention_h = nn.Linear(feature_dim, L * H)
            if cfg.cell == "lstm":
                self.init_attention_c = nn.Linear(feature_dim, L * H)

    def _input_size(self, feature_dim: int) -> int:
        """The language cell's input size: the context's and the attention cell's h (F + H)."""
        return feature_dim + self.cfg.hidden_size

    def _initial_cells(self, pooled: Tensor) -> tuple[Tensor, ...]:
        attention_c = getattr(self, "init_attention_c", None)
        return (
            *super()._initial_cells(pooled),
            *self._from_image(pooled, self.init_attention_h, attention_c),
        )

    def _memory(self, features: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        grid, mean = features.transpose(0, 1), features.mean(dim=1)  # [P, B, F], [B, F]
        return mean, (grid, self.attention.feature_proj(grid), mean[None])

    def _advance(self, x: Tensor, state: State) -> tuple[Tensor, State, Tensor | None]:
        n = self.cell_tensors
        language, attention, memory = state[:n], state[n : 2 * n], state[2 * n :]
        grid, projected, mean = memory
        query, attention = run_cell(
            self.attention_rnn, torch.cat([language[0][-1], mean[0], x], dim=-1), attention
        )  # query: the attention cell's top h_t [B, H]
        context, alpha = self.attention(grid, projected, query)  # [B, F], [B, P]
        out, language = run_cell(self.rnn, torch.cat([context, query], dim=-1), language)
        return out, (*language, *attention, *memory), alpha


# model.decoder.attention -> its decoder
DECODERS: dict[str, type[Decoder]] = {
    "none": PooledDecoder,
    "soft": SoftAttentionDecoder,
    "topdown": TopDownDecoder,
}


def build_decoder(
    cfg: DecoderConfig, feature_dim: int, vocab_size: int, pad_id: int = 0
) -> Decoder:
    """The decoder of ``cfg.attention`` (:data:`DECODERS`) for features of ``feature_dim`` and a
    vocabulary of ``vocab_size`` words, ``pad_id`` its padding."""
    return DECODERS[cfg.attention](feature_dim, vocab_size, cfg, pad_id)
