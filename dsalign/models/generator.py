"""The multimodal RNN generator of the paper (Eqs. 13-15) and an LSTM variant.

    b_v = W_hi CNN(I)
    h_t = f(W_hx x_t + W_hh h_{t-1} + b_h + 1(t=1) * b_v)
    y_t = softmax(W_oh h_t + b_o)

``cell="rnn"`` is exactly that with f = ReLU. ``cell="lstm"`` keeps the same wiring: the image context is added
to the gate pre-activations at the first step only. x_1 is the START token, and the sequence is trained to end
with END. The same :meth:`CaptionGenerator.step` serves teacher-forced training and decoding, so the two can
never disagree. The input is one CNN vector: the whole image (full-image captions) or one region (dense,
region-level descriptions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dsalign.models.config_io import JsonConfig, check_positive_ints
from dsalign.text import Vocabulary

CELLS = ("rnn", "lstm")
State = tuple[torch.Tensor, ...]


@dataclass
class GeneratorConfig(JsonConfig):
    """Sizes of :class:`CaptionGenerator` (serialised into checkpoints and bundles). The paper: hidden 512."""

    vocab_size: int
    feature_dim: int
    cell: str = "lstm"
    word_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.5

    def __post_init__(self) -> None:
        check_positive_ints(self, ("vocab_size", "feature_dim", "word_dim", "hidden_dim"))
        if self.cell not in CELLS:
            raise ValueError(f"model.cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout!r}")



def caption_targets(tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher forcing: inputs [N, T+1] = START w_1..w_T and targets [N, T+1] = w_1..w_n END, with -100 (the
    cross-entropy ignore index) after each sentence's END. ``mask`` must be right-padded."""
    n, length = tokens.shape
    lengths = mask.sum(1)
    start = torch.full((n, 1), Vocabulary.start_id, dtype=tokens.dtype, device=tokens.device)
    inputs = torch.cat([start, tokens * mask], 1)
    padded = torch.cat([tokens * mask, torch.zeros_like(start)], 1)
    steps = torch.arange(length + 1, device=tokens.device)
    targets = torch.where(steps < lengths[:, None], padded, torch.full_like(padded, -100))
    targets[torch.arange(n, device=tokens.device), lengths] = Vocabulary.end_id
    return inputs, targets


class CaptionGenerator(nn.Module):
    """Image (or region) vector + word prefix -> next-word distribution."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        gates = 4 if config.cell == "lstm" else 1
        self.embed = nn.Embedding(config.vocab_size, config.word_dim, padding_idx=Vocabulary.pad_id)
        self.input_proj = nn.Linear(config.word_dim, gates * config.hidden_dim)  # W_hx, b_h
        self.hidden_proj = nn.Linear(config.hidden_dim, gates * config.hidden_dim, bias=False)  # W_hh
        self.image_proj = nn.Linear(config.feature_dim, gates * config.hidden_dim)  # W_hi (b_v)
        self.out = nn.Linear(config.hidden_dim, config.vocab_size)  # W_oh, b_o
        self.dropout = nn.Dropout(config.dropout)
        if config.cell == "lstm":
            with torch.no_grad():  # forget gates start open, the usual LSTM initialisation
                self.input_proj.bias[config.hidden_dim:2 * config.hidden_dim].fill_(1.0)

    def init_output_bias(self, counts: torch.Tensor) -> None:
        """b_o = log of the training word frequencies (the paper's init), so step 0 already predicts the
        unigram distribution; words never seen get the log of half a count."""
        counts = counts.to(torch.float64).clamp(min=0.5)
        with torch.no_grad():
            self.out.bias.copy_((counts / counts.sum()).log().to(self.out.bias.dtype))

    def image_context(self, features: torch.Tensor) -> torch.Tensor:
        """b_v [N, gates*H] of image/region vectors [N, F]."""
        return self.image_proj(self.dropout(features))

    def initial_state(self, n: int, device: torch.device, dtype: torch.dtype = torch.float32) -> State:
        """Zeros: h in ``dtype`` (the gates' dtype: bf16 under autocast); the LSTM's memory c in fp32."""
        h = torch.zeros(n, self.config.hidden_dim, device=device, dtype=dtype)
        if self.config.cell == "rnn":
            return (h,)
        return h, torch.zeros(n, self.config.hidden_dim, device=device, dtype=torch.float32)

    def _cell(self, pre: torch.Tensor, state: State) -> State:
        if self.config.cell == "rnn":
            return (F.relu(pre),)
        # The memory c adds up over every step: kept in fp32 under bf16 autocast (8 mantissa bits would round
        # away what a forget gate near 1 keeps); h goes back to the gates' dtype for the next matmuls.
        i, f, g, o = pre.float().chunk(4, dim=1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return (torch.sigmoid(o) * torch.tanh(c)).to(pre.dtype), c

    def step(self, words: torch.Tensor, state: State, context: torch.Tensor | None = None,
             input_pre: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """One time step: word ids [N] (or their precomputed input projection), the state, and b_v on the first
        step only -> (logits [N, V], new state)."""
        if input_pre is None:
            input_pre = self.input_proj(self.dropout(self.embed(words)))
        pre = input_pre + self.hidden_proj(state[0])
        if context is not None:
            pre = pre + context
        state = self._cell(pre, state)
        return self.out(self.dropout(state[0])), state

    def forward(self, features: torch.Tensor, inputs: torch.Tensor, lengths: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Teacher-forced logits for inputs [N, T] (START first) given vectors [N, F]: [N, T, V], or with
        ``lengths`` (real steps per row) only the real steps, packed as :func:`packed_order` orders them
        [sum(lengths), V]. Packing skips the padding: training cost follows the real words, not N x T."""
        packed = lengths is not None
        if lengths is None:
            lengths = torch.full((inputs.shape[0],), inputs.shape[1], dtype=torch.long, device=inputs.device)
        order, active = packed_order(lengths)
        inputs, features = inputs[order], features[order]
        context = self.image_context(features)
        # All steps' W_hx x_t at once, time-major so each step's rows are one contiguous block (slicing a
        # [N, T, G] tensor per step would make autograd build a full-size zero gradient for every step).
        input_pre = self.input_proj(self.dropout(self.embed(inputs.T))).unbind(0)
        state = self.initial_state(inputs.shape[0], inputs.device, context.dtype)
        hidden = []
        for t, n in enumerate(active):
            state = tuple(s[:n] for s in state)  # rows are sorted by length: the live ones are a prefix
            pre = input_pre[t][:n] + self.hidden_proj(state[0]) + (context if t == 0 else 0)
            state = self._cell(pre, state)
            hidden.append(state[0])
        logits = self.out(self.dropout(torch.cat(hidden)))
        if packed:
            return logits
        return logits.view(len(active), -1, logits.shape[-1]).transpose(0, 1)[order.argsort()]


def packed_order(lengths: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Rows by descending length (stable) and, per time step, how many rows are still running."""
    order = torch.sort(lengths, descending=True, stable=True).indices
    counts = torch.bincount(lengths.cpu(), minlength=int(lengths.max()) + 1 if len(lengths) else 1)
    running = len(lengths) - counts.cumsum(0)
    return order, [int(n) for n in running[: int(lengths.max()) if len(lengths) else 0]]


def packed_targets(targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Targets [N, T] in the packed order of :meth:`CaptionGenerator.forward` with the same ``lengths``."""
    order, active = packed_order(lengths)
    ordered = targets[order]
    return torch.cat([ordered[:n, t] for t, n in enumerate(active)])


def teacher_forced_loss(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], features: torch.Tensor,
                        tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of every target word and END, number of targets) for sentences [N, T].

    ``forward`` is the generator or the DeepSpeed engine wrapping it (whose call applies its autocast).
    """
    inputs, targets = caption_targets(tokens, mask)
    lengths = mask.sum(1) + 1  # the words and END
    logits = forward(features, inputs, lengths)
    flat = packed_targets(targets, lengths)
    return F.cross_entropy(logits.float(), flat, reduction="sum"), int(flat.numel())
