"""How similar the inputs of a model's layers are, and what a CQIL grouping costs in quality.

    layer_input_similarity(model, ids)      [L, L] mean cosine similarity of the inputs of layers i, j
    ReferenceRun(model, ids)                one pass of the ORIGINAL model over held-out text
    reference.evaluate(cqil)                perplexity, greedy agreement, KL for one grouping, and the
                                            intervals of a paired bootstrap over the windows

Perplexity uses a sliding window (`window` tokens, moved by `stride`), as in transformers' perplexity
guide: a token is scored in the first window where it falls after the previous window's end, with the
window's earlier tokens as context; a token that has none there (the first of the text, and with
stride == window the first of every window) is not scored. stride < window gives every later token
context. The same windows and scored positions serve
every metric: agreement is the fraction of scored positions where the grouped model's top-1 next token
equals the original's, and KL is the mean over scored positions of KL(original || grouped) of the
next-token distributions.

A perplexity ratio over one or two windows is too noisy to decide a budget of a few percent: the same
grouping of SmolLM2 cost -0.5% on one 512-token window and +15% on another of the same document. So each
grouping's windows are compared with the original's on the same windows (paired), and the windows are
resampled with replacement (a bootstrap, seeded): the interval's upper end is what the search holds to
the budget, and KL, which varies far less from window to window, ranks the groupings that fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import CQILConfig


def _check_ids(ids: torch.Tensor, vocab_size: int, min_len: int, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor of token ids")
    ids = ids.reshape(-1)
    if ids.numel() < min_len:
        raise ValueError(f"{what} has {ids.numel()} tokens; at least {min_len} are needed")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"{what} holds token id {low if low < 0 else high}, outside the model's vocabulary "
                         f"[0, {vocab_size}): was it made by another model's tokenizer?")
    return ids


@torch.inference_mode()
def layer_input_similarity(model, ids: torch.Tensor, window: int = 512) -> torch.Tensor:
    """[L, L] mean over tokens of cos(x_i, x_j), x_l the hidden state entering layer l (original order).

    ids: token ids (any shape; read as one text), cut into windows of `window` tokens run one at a
    time with the model's grouping switched off. Memory: one window's L inputs at a time. The pass runs
    the torch backend: the inputs are read by hooks on the layer modules, which the fused backend never
    calls.
    """
    ids = _check_ids(ids, model.args.vocab_size, 2, "ids")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    L = model.args.num_hidden_layers
    gram = torch.zeros(L, L, dtype=torch.float64)
    count = 0
    inputs = [None] * L
    hooks = [layer.register_forward_pre_hook(
        lambda module, args, l=l: inputs.__setitem__(l, args[0])) for l, layer in enumerate(model.layers)]
    saved_backend, model.backend = model.backend, "torch"
    try:
        with model.grouping(CQILConfig()):
            for begin in range(0, ids.numel(), window):
                chunk = ids[begin:begin + window].to(model.device)
                model(chunk[None])
                x = F.normalize(torch.stack(inputs).reshape(L, chunk.numel(), -1).float(), dim=-1)
                gram += torch.einsum("ind,jnd->ij", x, x).double().cpu()
                count += chunk.numel()
    finally:
        model.backend = saved_backend
        for hook in hooks:
            hook.remove()
    return (gram / count).float()


@dataclass(frozen=True)
class Metrics:
    perplexity: float
    agreement: float  # top-1 next-token agreement with the original model
    kl: float  # mean KL(original || this) of next-token distributions, nats
    tokens: int  # scored positions
    windows: int = 1
    # against the original on the same windows: the relative perplexity increase and the KL, each as the
    # (low, high) bounds of a paired bootstrap interval over the windows (None for the original itself)
    ppl_increase_ci: tuple[float, float] | None = None
    kl_ci: tuple[float, float] | None = None

    def row(self) -> dict:
        row = dict(ppl=round(self.perplexity, 4), agreement=round(self.agreement, 4), kl=round(self.kl, 5),
                   tokens=self.tokens, windows=self.windows)
        if self.ppl_increase_ci is not None:
            row["ppl_increase_ci_pct"] = [round(100 * x, 3) for x in self.ppl_increase_ci]
            row["kl_ci"] = [round(x, 5) for x in self.kl_ci]
        return row


def paired_bootstrap(base: torch.Tensor, new: torch.Tensor, tokens: torch.Tensor, *, samples: int = 2000,
                     confidence: float = 0.90, seed: int = 0, ratio: bool = True) -> tuple[float, float]:
    """(low, high) interval of a statistic of per-window sums compared on the same windows.

    base, new: [W] per-window sums (e.g. negative log-likelihoods) of the original and a grouping; tokens:
    [W] scored tokens per window. Each of `samples` resamples draws W windows with replacement, the same
    for both (paired); its statistic is exp((sum new - sum base) / sum tokens) - 1 (ratio=True: the
    relative perplexity increase) or sum new / sum tokens (ratio=False: e.g. a mean KL). The interval
    holds the central `confidence` of the resamples; its upper end is a one-sided bound at
    (1 + confidence) / 2. Deterministic for a seed."""
    W = base.numel()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, W, (samples, W), generator=g)
    n = tokens.double()[idx].sum(1)
    if ratio:
        stat = torch.exp((new.double()[idx].sum(1) - base.double()[idx].sum(1)) / n) - 1
    else:
        stat = new.double()[idx].sum(1) / n
    tail = (1 - confidence) / 2
    low, high = torch.quantile(stat, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


class ReferenceRun:
    """The original model's next-token log-probabilities on held-out text, kept for comparing groupings.

    Memory: scored tokens x vocab floats (fp32), e.g. 2,000 tokens of SmolLM2 (49,152 entries) take 393 MB:
    on the model's GPU when they take at most a quarter of its free memory, else on the CPU. A grouping's
    windows are scored as they come out of the model, on its device, and only three numbers per window
    (negative log-likelihood, KL, agreements) leave it. Scored on the CPU, each SmolLM2 grouping cost
    `cqil calibrate` 3.6 s on the H100 for ~50 ms of forwards (3ab933a): 3.2 GB of log-probabilities
    of 32 windows of 512 tokens were moved to the host and reduced there.
    """

    @staticmethod
    def check_text(ids: torch.Tensor, model, window: int) -> torch.Tensor:
        """The text's ids, flattened; ValueError if they do not fill one window or do not fit the model."""
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        ids = _check_ids(ids, model.args.vocab_size, 2, "the text")
        if ids.numel() < window:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: use a "
                             f"longer text or a smaller window")
        return ids

    @staticmethod
    def windows(tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
        """(begin, end, first scored position) of each window over a text of `tokens` tokens; every
        position but the first is scored once, by the first window that reaches it."""
        spans = []
        prev_end = 1  # position 0 has no context: never scored
        for begin in range(0, tokens, stride):
            end = min(begin + window, tokens)
            if end > prev_end:
                spans.append((begin, end, max(prev_end, begin + 1)))
                prev_end = end
            if end == tokens:
                break
        return spans

    MAX_BYTES = 16 << 30  # the reference log-probabilities a run may keep (16 GiB)

    @staticmethod
    def store_device(model, nbytes: int) -> torch.device:
        """Where `nbytes` of reference log-probabilities are kept: the model's GPU if they take at most a
        quarter of its free memory (the rest is for the forwards' logits), else the CPU."""
        if model.device.type == "cuda" and nbytes <= torch.cuda.mem_get_info(model.device)[0] // 4:
            return model.device
        return torch.device("cpu")

    @torch.inference_mode()
    def __init__(self, model, ids: torch.Tensor, window: int = 512, stride: int | None = None, *,
                 bootstrap_samples: int = 2000, confidence: float = 0.90, seed: int = 0,
                 store: str | torch.device | None = None):
        """store: where the reference log-probabilities are kept (None: store_device chooses; "cpu" leaves the
        GPU's memory to other work between evaluations, e.g. training)."""
        stride = stride or window
        if window < 2 or not 1 <= stride <= window:
            raise ValueError(f"need window >= 2 and 1 <= stride <= window, got {window}, {stride}")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.bootstrap = dict(samples=bootstrap_samples, confidence=confidence, seed=seed)
        self.model, self.ids = model, self.check_text(ids, model, window)
        need = (self.ids.numel() - 1) * model.args.vocab_size * 4
        if need > self.MAX_BYTES:
            keep = self.MAX_BYTES // (model.args.vocab_size * 4)
            raise ValueError(f"scoring {self.ids.numel() - 1} tokens keeps {need / 2**30:.1f} GiB of reference "
                             f"log-probabilities (tokens x vocab {model.args.vocab_size} x 4 bytes), more than "
                             f"{self.MAX_BYTES / 2**30:.0f} GiB: use at most {keep} tokens of held-out text")
        self.spans = self.windows(self.ids.numel(), window, stride)
        store = self.store_device(model, need) if store is None else torch.device(store)
        self.targets = [self.ids[first:end][:, None].to(model.device) for _, end, first in self.spans]
        self.logprobs: list[torch.Tensor | None] = [None] * len(self.spans)  # [scored tokens, vocab] each
        with model.grouping(CQILConfig()):
            for i, lp in self._scored():
                self.logprobs[i] = lp.to(store)
        self.window_tokens = torch.tensor([lp.shape[0] for lp in self.logprobs], dtype=torch.float64)
        self.window_nll = torch.stack([self._nll(i, self.logprobs[i]) for i in range(len(self.spans))]).cpu()
        W = len(self.spans)
        # the original against itself: no KL, every position agrees
        self.baseline = self._metrics(self.window_nll, torch.zeros(W, dtype=torch.float64), self.window_tokens,
                                      reference=True)

    BATCH_BYTES = 1 << 30  # the fp32 logits of the windows one forward scores together

    def _scored(self):
        """(window index, its [scored tokens, vocab] fp32 log-probabilities on the model's device) of every
        span under the model's current grouping, windows of one length through the model together (at most
        BATCH_BYTES of logits at a time), so not in window order."""
        by_length: dict[int, list[int]] = {}
        for i, (begin, end, _) in enumerate(self.spans):
            by_length.setdefault(end - begin, []).append(i)
        for length, members in by_length.items():
            per_call = max(1, self.BATCH_BYTES // (length * self.model.args.vocab_size * 4))
            for k in range(0, len(members), per_call):
                chunk = members[k:k + per_call]
                ids = torch.stack([self.ids[self.spans[i][0]:self.spans[i][1]] for i in chunk])
                logits = self.model(ids.to(self.model.device))
                for row, i in enumerate(chunk):
                    begin, end, first = self.spans[i]
                    yield i, logits[row, first - 1 - begin:end - 1 - begin].float().log_softmax(-1)

    def _nll(self, i: int, lp: torch.Tensor) -> torch.Tensor:
        """Window i's summed negative log-likelihood (a float64 scalar on lp's device)."""
        return -lp.gather(-1, self.targets[i].to(lp.device)).double().sum()

    def _window_metrics(self, i: int, lp: torch.Tensor) -> torch.Tensor:
        """[3] float64 on lp's device: window i's summed NLL, summed KL(original || lp) over its positions,
        and the positions whose top-1 token agrees with the original's."""
        ref = self.logprobs[i].to(lp.device)
        kl = (ref.exp() * (ref - lp)).sum(-1).double().sum()
        agree = (lp.argmax(-1) == ref.argmax(-1)).sum().double()
        return torch.stack([self._nll(i, lp), kl, agree])

    def _metrics(self, nll: torch.Tensor, kl: torch.Tensor, agree: torch.Tensor, reference: bool = False) -> Metrics:
        """Metrics from per-window [W] float64 sums (CPU): NLL, KL, agreements."""
        n = self.window_tokens.sum().item()
        ppl_ci = kl_ci = None
        if not reference:
            ppl_ci = paired_bootstrap(self.window_nll, nll, self.window_tokens, **self.bootstrap)
            kl_ci = paired_bootstrap(self.window_nll, kl, self.window_tokens, ratio=False, **self.bootstrap)
        return Metrics(math.exp(nll.sum().item() / n), agree.sum().item() / n, kl.sum().item() / n, int(n),
                       len(self.spans), ppl_ci, kl_ci)

    def _per_window(self, cqil: CQILConfig, fn) -> torch.Tensor:
        """fn(i, log-probabilities of window i) of every window under grouping `cqil`, stacked in window order
        and moved to the CPU at once."""
        out: list[torch.Tensor | None] = [None] * len(self.spans)
        with self.model.grouping(cqil):
            for i, lp in self._scored():
                out[i] = fn(i, lp)
        return torch.stack(out).cpu()

    @torch.inference_mode()
    def grouped_window_nll(self, cqil: CQILConfig) -> torch.Tensor:
        """[windows] summed negative log-likelihood of each window's scored tokens under grouping `cqil`
        (window_nll is the original's), for analyses of the windows' spread."""
        return self._per_window(cqil, self._nll)

    @torch.inference_mode()
    def evaluate(self, cqil: CQILConfig) -> Metrics:
        """Metrics of the model with grouping `cqil` on the same windows (the model's own grouping is
        restored afterwards)."""
        nll, kl, agree = self._per_window(cqil, self._window_metrics).unbind(1)
        return self._metrics(nll, kl, agree)


# --------------------------------------------------------------------------------------------------
# Group search


@dataclass
class SearchResult:
    config: CQILConfig  # the chosen grouping
    baseline: Metrics  # the original model on the evaluation text
    chosen: Metrics  # the chosen grouping on the same text
    candidates: list[dict]  # one row per grouping evaluated, in the order tried
    similarity: torch.Tensor  # [L, L] layer-input similarity on the calibration text

    @property
    def layers_saved(self) -> int:
        return self.config.layers_saved


def _ranked_groups(sim: torch.Tensor, sizes: tuple[int, ...]) -> list[tuple[float, tuple[int, ...]]]:
    """Every run of consecutive layers of an allowed size, scored by the least similarity between the
    inputs of any two of its layers (a group is only as independent as its most different pair)."""
    L = sim.shape[0]
    ranked = []
    for size in sizes:
        for start in range(0, L - size + 1):
            layers = tuple(range(start, start + size))
            score = sim[start:start + size, start:start + size].min().item()
            ranked.append((score, layers))
    return sorted(ranked, key=lambda item: (-item[0], item[1]))


MIN_WINDOWS = 8  # the fewest windows a budget is decided on (the bootstrap interval needs several)


def find_quasi_independent_layers(model, calib_ids: torch.Tensor, eval_ids: torch.Tensor | None = None, *,
                                  parallel: int | tuple[int, ...] = 2, max_ppl_increase: float = 0.05,
                                  bypass: int = 0, bypass_mode: str = "residual", window: int = 512,
                                  stride: int | None = None, beam: int = 6, confidence: float = 0.90,
                                  bootstrap_samples: int = 2000, seed: int = 0, min_windows: int = MIN_WINDOWS,
                                  progress=None) -> SearchResult:
    """Propose CQIL groups that remove the most sequential layer steps within a perplexity budget.

    1. The similarity of layer inputs on `calib_ids` ranks every run of `parallel` consecutive layers
       (several sizes, e.g. (2, 3, 4), mix) by its least similar pair.
    2. Greedy, confirmed by the real metric: starting from no groups, each round evaluates the grouping
       plus each of the `beam` best-ranked runs that do not overlap it (on `eval_ids`, default
       calib_ids) and keeps the one that saves the most layers whose perplexity increase over the
       original, at the upper end of its paired bootstrap interval over the windows (`confidence`, e.g.
       0.90: a one-sided 95% bound), stays within max_ppl_increase; among those, the lowest KL. It stops
       when no run fits. Every grouping evaluated is a row of `.candidates`, with its intervals.
       Deterministic for a seed. The text must give at least `min_windows` windows.
    """
    sizes = (parallel,) if isinstance(parallel, int) else tuple(parallel)
    L = model.args.num_hidden_layers
    if not sizes or any(isinstance(p, bool) or not isinstance(p, int) or p < 2 for p in sizes):
        raise ValueError(f"parallel must be an int >= 2 or a tuple of them, got {parallel!r}")
    if max(sizes) > L:
        raise ValueError(f"parallel={max(sizes)} exceeds the model's {L} layers")
    if not max_ppl_increase > 0:
        raise ValueError(f"max_ppl_increase must be > 0 (a fraction, e.g. 0.05 for 5%), got {max_ppl_increase}")
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    CQILConfig((), bypass, bypass_mode)  # validates bypass and mode before any long work
    text = ReferenceRun.check_text(eval_ids if eval_ids is not None else calib_ids, model, window)
    step = stride or window
    windows = len(ReferenceRun.windows(text.numel(), window, step))
    if windows < min_windows:
        need = window + (min_windows - 1) * step
        raise ValueError(f"the evaluation text gives {windows} window(s) of {window} tokens; deciding a budget on "
                         f"the windows' spread needs at least {min_windows}: {need} tokens (it has "
                         f"{text.numel()}), or a smaller --window")

    sim = layer_input_similarity(model, calib_ids, window=window)
    reference = ReferenceRun(model, text, window=window, stride=stride, confidence=confidence,
                             bootstrap_samples=bootstrap_samples, seed=seed)
    ranked = _ranked_groups(sim, sizes)
    chosen: list[tuple[int, ...]] = []
    chosen_metrics = reference.baseline
    rows: list[dict] = []
    while True:
        taken = {l for g in chosen for l in g}
        options = [g for _, g in ranked if not taken.intersection(g)][:beam]
        best = None
        for group in options:
            groups = tuple(sorted(chosen + [group]))
            config = CQILConfig(groups, bypass, bypass_mode)
            metrics = reference.evaluate(config)
            ok = metrics.ppl_increase_ci[1] <= max_ppl_increase
            rows.append(dict(groups=[list(g) for g in groups], layers_saved=config.layers_saved,
                             ppl_increase_pct=round(100 * (metrics.perplexity / reference.baseline.perplexity - 1), 3),
                             within_budget=ok, **metrics.row()))
            if progress is not None:
                progress(rows[-1])
            key = (config.layers_saved, -metrics.kl)
            if ok and (best is None or key > best[0]):
                best = (key, group, metrics)
        if best is None:
            break
        chosen.append(best[1])
        chosen_metrics = best[2]
    config = CQILConfig(tuple(sorted(chosen)), bypass, bypass_mode)
    return SearchResult(config, reference.baseline, chosen_metrics, rows, sim)


# --------------------------------------------------------------------------------------------------
# Reading text and drawing the similarity figure (used by `cqil calibrate` / `cqil eval`)


def read_token_ids(path, model_src=None) -> torch.Tensor:
    """Token ids from a file: `.pt` (a saved integer tensor), `.ids` (whitespace-separated integers), or
    text tokenized with the tokenizer of `model_src` (a Hugging Face directory or a .gguf file)."""
    from .files import load_token_tensor, read_text, regular_file

    path = regular_file(path, "text file")
    if path.suffix == ".pt":
        ids = load_token_tensor(path)
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{path} holds {ids.dtype} values, not integer token ids")
        return ids.reshape(-1).long()
    if path.suffix == ".ids":
        try:
            return torch.tensor([int(t) for t in read_text(path, "token file").split()], dtype=torch.long)
        except (ValueError, OverflowError, RuntimeError):
            raise ValueError(f"{path}: a .ids file holds whitespace-separated integers") from None
    if model_src is None:
        raise ValueError(f"{path}: tokenizing text needs the model's tokenizer (a model directory or .gguf)")
    return tokenize(read_text(path), model_src)


def load_tokenizer(model_src):
    """The tokenizer of `model_src` (a Hugging Face directory or a .gguf file), via transformers."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from .files import regular_file

    src = Path(model_src)
    if not src.exists():  # transformers would take it for a hub id and say so
        raise FileNotFoundError(f"{src}: no such model directory or .gguf file")
    if not src.is_dir() and src.suffix != ".gguf":  # transformers would read the file as a tokenizer's JSON config
        raise ValueError(f"{src}: expected a model directory (with its tokenizer) or a .gguf file")
    folder = src.parent if src.suffix == ".gguf" else src
    present = [folder / name for name in TOKENIZER_FILES if (folder / name).exists()]
    if src.is_dir() and not present:
        raise ValueError(f"{src}: no tokenizer in this model directory (none of {', '.join(TOKENIZER_FILES)})")
    for path in present:  # transformers would block reading a FIFO named like one
        regular_file(path, "tokenizer file")
    return (AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name) if src.suffix == ".gguf"
            else AutoTokenizer.from_pretrained(str(src)))


def tokenize(text: str, model_src) -> torch.Tensor:
    """[tokens] int64 ids of `text` under the tokenizer of `model_src` (with its start-of-text token, if
    it adds one)."""
    return load_tokenizer(model_src)(text, return_tensors="pt").input_ids[0]


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def plot_similarity(sim: torch.Tensor, config: CQILConfig, path, title: str = "") -> None:
    """Heatmap of the layer-input similarity with the groups outlined, and the adjacent-layer curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    L = sim.shape[0]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw=dict(width_ratios=[1, 1.25]))
    im = ax.imshow(sim.numpy(), vmin=min(0.0, float(sim.min())), vmax=1.0, cmap="viridis")
    for group in config.groups:
        ax.add_patch(Rectangle((group[0] - 0.5, group[0] - 0.5), len(group), len(group), fill=False,
                               edgecolor="red", lw=1.6))
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title("cosine similarity of layer inputs", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    adjacent = sim.diagonal(1).numpy()
    ax2.plot(range(1, L), adjacent, marker="o", ms=3)
    for group in config.groups:
        ax2.axvspan(group[0] + 0.5, group[-1] + 0.5, color="red", alpha=0.15)
    ax2.set_xlabel("layer l (similarity of the inputs of l-1 and l)")
    ax2.set_ylabel("cosine similarity")
    ax2.set_title("adjacent layers; shaded: chosen groups", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
