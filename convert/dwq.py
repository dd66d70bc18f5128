"""DWQ, distilled weight quantization: keep the integer codes of a quantized model and train its
affine scales and biases end to end, with Adam, to minimize KL(teacher || student) between the
float model's and the quantized model's next-token distributions on calibration text.

Layer-wise methods (AWQ, GPTQ) each minimize one layer's output error; the errors of 18 or 48
layers still compound. DWQ sees the whole model's output, so it can trade errors between layers.
The student starts from round to nearest (`dwq`) or from a calibrated method's result (`awq+dwq`,
`gptq+dwq`: that method runs first, layer by layer, and its codes are kept; AWQ's folded norms
and scaled weights stay as AWQ left them). Only the scales and biases of the quantized decoder
Linears (and, with `train_embedding`, of the tied embedding / LM head) move; norms and every
other float part are frozen. Training runs in float32; the result is cast to the stored dtype
and written as plain MLX affine quantization.

Restricted vocabulary. The Gemma vocabulary has 262144 entries and the head is tied to the
embedding: a full head forward and backward per token costs as much as the rest of a small
model. The KL is computed on the union `V_b` of the teacher's top-`top_k` tokens over the
positions of a batch, both distributions renormalized on it; the teacher's log-probabilities on
`V_b` are computed once, before training, and kept (`DistillReport.restricted_kl` and `full_kl`
give the approximation on the first prompt, before and after training: on Gemma 3 270M the
restricted KL is 3% below the full one before training and 18-19% below after 32 steps, as the
renormalized loss does not see mass the student moves outside `V_b`;
benchmarks/results/dwq_quality_gemma3_270m.md).

Memory (what is bounded, and what is not; 12B figures are estimates, not measured: this
machine has no GPU):
- Teacher: never whole in float32. The source is read lazily, one decoder layer at a time; each
  layer is cast to float32, runs the calibration batches' hidden states (all of them: `samples x
  length x hidden` float32, 126 MB at 32 x 256 on the 12B) and is then replaced by its quantized
  student form, so the float weights held at once are one layer (~1 GB float32 on the 12B) plus
  the float32 embedding (262144 x hidden: 0.67 GB on the 270M, 4 GB on the 12B), which is
  quantized once the teacher's targets are computed.
- Targets: per batch `batch_size x length x |V_b|` float32 log-probs (|V_b| about 3,000 at top_k
  32 and 4 x 128 tokens): ~10 MB per batch, all batches kept in memory; plus the first prompt's
  full-vocabulary teacher logits for the approximation check (`length` MB).
- Student: the packed codes (0.5 byte per weight at 4-bit: 6 GB on the 12B) and per group the
  float32 `s0`, `b0`, `ds`, `db` (2 values per 64 weights each pair: 3 GB on the 12B), plus the
  gradients and Adam's two moments of `ds`, `db` (4.5 GB).
- Activations for the backward pass: NOT bounded by layer: autodiff keeps every layer's
  activations of the batch (on the 12B roughly 0.25 GB per layer for 4 x 256 tokens, 12 GB for
  48 layers). `checkpoint=True` recomputes each layer in the backward pass and keeps only its
  input (0.75 GB for 48 layers), at about 1.3x the compute. On the CPU backend the student
  multiplies by dequantized float32 weights (see `_Student`), which the backward pass keeps too:
  the CPU path is for small models.
So a 12B DWQ at batch 4 x 256 with `checkpoint=True` should peak around 15 GB on Metal: feasible
on a 24-32 GB Mac.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from gemma_mlx.cache import attention_mask
from gemma_mlx.config import SLIDING
from gemma_mlx.models.gemma import Model
from gemma_mlx.processor import Inputs

from .calibrate import CalibrationReport
from .quantize import QuantSpec, quantize_weight

# `--method` values that distill: the student's codes come from RTN, AWQ or GPTQ
DISTILLED = {"dwq": "rtn", "awq+dwq": "awq", "gptq+dwq": "gptq"}
STEPS = 64
LEARNING_RATE = 1e-3  # relative to each group's starting scale (see _Student)
BATCH_SIZE = 4
TOP_K = 32
# the tied embedding / LM head keeps RTN by default: training its scales too measured no gain
# (Gemma 3 270M, 6 steps: first-prompt full KL 0.519 frozen, 0.527 trained)
TRAIN_EMBEDDING = False


@dataclass
class DistillReport(CalibrationReport):
    steps: int = 0
    learning_rate: float = 0.0
    batch_size: int = 0
    top_k: int = 0
    vocab: list[int] = field(default_factory=list)  # |V_b| of each batch
    losses: list[float] = field(default_factory=list)  # restricted KL of each step (before it)
    # restricted and full-vocabulary KL of the student on the first prompt, before and after training
    restricted_kl: tuple[float, float] = (0.0, 0.0)
    full_kl: tuple[float, float] = (0.0, 0.0)
    trained: list[str] = field(default_factory=list)  # module paths whose scales/biases trained


class DistillError(ValueError):
    """Arguments DWQ cannot work with (names the argument and what was expected)."""


@dataclass
class _Batch:
    ids: mx.array  # [B, L]
    vocab: mx.array | None = None  # V_b, sorted token ids
    target: mx.array | None = None  # teacher log-probs on V_b, [B, L, |V_b|]


def check_settings(steps: int, learning_rate: float, batch_size: int, top_k: int) -> None:
    """Raise `DistillError` naming the setting that is out of range."""
    if not isinstance(steps, int) or steps < 0:
        raise DistillError(f"--dwq-steps {steps!r}: expected an integer >= 0")
    if not (isinstance(learning_rate, int | float) and np.isfinite(learning_rate) and learning_rate > 0):
        raise DistillError(f"DWQ learning rate {learning_rate!r}: expected a finite number > 0")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DistillError(f"DWQ batch size {batch_size!r}: expected an integer >= 1")
    if not isinstance(top_k, int) or top_k < 1:
        raise DistillError(f"DWQ top_k {top_k!r}: expected an integer >= 1")


def _check_layout(layout: Mapping[str, QuantSpec | None]) -> None:
    modes = {s.mode for s in layout.values() if s is not None}
    if modes - {"affine"}:
        raise DistillError(
            f"--method dwq trains affine scales and biases; got --mode {', '.join(sorted(modes))}"
        )


def _make_batches(samples: list[Inputs], batch_size: int) -> list[_Batch]:
    """Text prompts of equal length, `batch_size` at a time (prompts with media are left out)."""
    groups: dict[int, list[list[int]]] = {}
    for s in samples:
        if not s.has_media:
            groups.setdefault(len(s.ids), []).append(s.ids)
    return [
        _Batch(mx.array(ids[i : i + batch_size]))
        for ids in groups.values()
        for i in range(0, len(ids), batch_size)
    ]


def _module(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the module at `path`."""
    parent_path, _, name = path.rpartition(".")
    parent = root
    for part in parent_path.split("."):
        parent = parent[int(part)] if isinstance(parent, list) else getattr(parent, part)
    return parent, name


def _get(root: nn.Module, path: str) -> nn.Module:
    parent, name = _module(root, path)
    return getattr(parent, name)


class _Student(nn.Module):
    """A quantized Linear or Embedding under training: frozen packed codes and starting scales
    `s0` and biases `b0`; trained offsets `ds`, `db` in units of the group's starting scale:
    `scales = s0 (1 + ds)`, `biases = b0 + s0 db`. So one learning rate means the same relative
    step for every group of every model, whatever its weights' magnitude.

    On the CPU backend MLX's quantized matmul is ~30x slower than a float matmul on the
    dequantized weight (512 x 640 @ 640 x 2048: 1.17 s against 0.044 s with OpenBLAS), so there
    the product is `x @ dequantize(...)^T`, the same numbers; elsewhere the quantized kernel."""

    def __init__(self, q: Mapping[str, mx.array], spec: QuantSpec, embedding: bool):
        super().__init__()
        self.group_size, self.bits, self.mode, self.embedding = (
            spec.group_size,
            spec.bits,
            spec.mode,
            embedding,
        )
        self.weight = q["weight"]
        self.s0 = q["scales"].astype(mx.float32)
        self.b0 = q["biases"].astype(mx.float32)
        self.ds = mx.zeros_like(self.s0)
        self.db = mx.zeros_like(self.b0)
        self.freeze()
        self.unfreeze(keys=["ds", "db"], recurse=False)

    def affine(self, rows: mx.array | None = None) -> tuple[mx.array, mx.array, mx.array]:
        """(codes, scales, biases), of `rows` only if given."""
        w, s0, b0, ds, db = self.weight, self.s0, self.b0, self.ds, self.db
        if rows is not None:
            w, s0, b0, ds, db = w[rows], s0[rows], b0[rows], ds[rows], db[rows]
        return w, s0 * (1 + ds), b0 + s0 * db

    def matmul(self, x: mx.array, rows: mx.array | None = None) -> mx.array:
        """`x @ W[rows]^T` (all rows when None)."""
        w, s, b = self.affine(rows)
        if mx.default_device() == mx.cpu:
            return x @ mx.dequantize(w, s, b, self.group_size, self.bits, mode=self.mode).T
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=self.group_size, bits=self.bits)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.embedding:
            return self.matmul(x)
        w, s, b = self.affine(x)  # rows looked up
        return mx.dequantize(w, s, b, self.group_size, self.bits, mode=self.mode)


def _quantize_into(
    model: Model,
    paths: list[str],
    layout: Mapping[str, QuantSpec | None],
    start: Callable[[str], Mapping[str, mx.array] | None],
    dtype_of: Callable[[str], mx.Dtype],
) -> None:
    """Replace the modules at `paths` by their quantized student form: the triple `start(path)`
    gives (a calibrated method's), else RTN of the float weight in its stored dtype."""
    for path in paths:
        parent, name = _module(model, path)
        m = getattr(parent, name)
        q = start(path) or quantize_weight(m.weight, layout[path], dtype_of(f"{path}.weight"))
        new = _Student(q, layout[path], isinstance(m, nn.Embedding))
        mx.eval(new.parameters())
        setattr(parent, name, new)


def _head(model: Model, h: mx.array, vocab: mx.array | None) -> mx.array:
    """The tied head's logits for the tokens `vocab` (all when None), softcapped as the model does."""
    emb = model.language_model.embed_tokens
    if isinstance(emb, _Student):
        out = emb.matmul(h, vocab)
    else:
        out = emb.as_linear(h) if vocab is None else h @ emb.weight[vocab].T
    cap = model.config.text.final_logit_softcapping
    return out if cap is None else mx.tanh(out / cap) * cap


def _log_softmax(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _kl(target: mx.array, logits: mx.array) -> mx.array:
    """Mean over positions of KL(target || softmax(logits)); `target` holds log-probs."""
    return mx.mean(mx.sum(mx.exp(target) * (target - _log_softmax(logits)), axis=-1))


def _teacher_targets(model: Model, b: _Batch, h: mx.array, top_k: int) -> None:
    """`b.vocab` (union of the teacher's top-k over the batch) and the teacher's log-probs on it.
    The full-vocabulary logits (1 MB per token) exist for one prompt at a time; the restricted
    ones are computed again from the final hidden states `h`, at |V_b| / vocabulary of the cost."""
    tops = set()
    for i in range(h.shape[0]):
        logits = _head(model, h[i : i + 1], None)
        tops.update(np.array(mx.argpartition(-logits, top_k - 1, axis=-1)[..., :top_k]).ravel().tolist())
    b.vocab = mx.array(sorted(tops), dtype=mx.int32)
    b.target = _log_softmax(_head(model, h, b.vocab))
    mx.eval(b.vocab, b.target)


def _student_logits(model: Model, ids: mx.array, vocab: mx.array | None, checkpoint: bool) -> mx.array:
    lm = model.language_model
    h = lm.embed(ids)
    if checkpoint:
        cfg = model.config.text
        masks = {
            t: attention_mask(None, ids.shape[1], cfg.sliding_window if t == SLIDING else None)
            for t in set(cfg.layer_types)
        }
        for layer, t in zip(lm.layers, cfg.layer_types, strict=True):

            def run(params, x, layer=layer, t=t):
                layer.update(params)
                return layer(x, masks[t])[0]

            h = mx.checkpoint(run)(layer.trainable_parameters(), h)
        h = lm.norm(h)
    else:
        h = lm(h)[0]
    return _head(model, h, vocab)


def _first_kl(model: Model, b: _Batch, teacher: mx.array) -> tuple[float, float]:
    """(restricted, full-vocabulary) KL of the student on the first prompt of `b`, whose
    full-vocabulary teacher logits are `teacher`."""
    ids = b.ids[:1]
    restricted = _kl(b.target[:1], _student_logits(model, ids, b.vocab, False))
    full = _kl(_log_softmax(teacher), _student_logits(model, ids, None, False))
    return float(restricted), float(full)


def distill(
    model: Model,
    layout: Mapping[str, QuantSpec | None],
    samples: list[Inputs],
    dtype_of: Callable[[str], mx.Dtype],
    *,
    method: str = "dwq",
    start: Mapping[str, mx.array] | None = None,
    steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    top_k: int | None = None,
    train_embedding: bool | None = None,
    checkpoint: bool = False,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, mx.array], set[str], DistillReport]:
    """Distill the quantized form of `model` (a float source, weights loaded lazily) from the
    model itself, on the text prompts of `samples`, as `layout` says (module path -> affine spec,
    None: float). `dtype_of(parameter name)`: the dtype the writer stores it in.

    `start`: a calibrated method's replacements (`calibrate`'s first result): float tensors are
    loaded over the source; for each planned module whose `weight`, `scales` and `biases` are all
    there, those codes are the student's (else RTN). `steps` Adam steps at `learning_rate`, cycling
    over batches of `batch_size` prompts; `top_k`: the teacher tokens per position whose union is
    the batch's vocabulary; `train_embedding`: train the tied embedding's scales too (else it stays
    RTN); `checkpoint`: recompute each layer in the backward pass (memory, see the module).

    Returns (parameter name -> replacement, the module paths stored quantized, the report), as
    `calibrate.calibrate` does: every planned text-model module comes quantized. Settings left
    None take the module's defaults (`STEPS`, `LEARNING_RATE`, `BATCH_SIZE`, `TOP_K`,
    `TRAIN_EMBEDDING`), read at call time."""
    steps = STEPS if steps is None else steps
    learning_rate = LEARNING_RATE if learning_rate is None else learning_rate
    batch_size = BATCH_SIZE if batch_size is None else batch_size
    top_k = TOP_K if top_k is None else top_k
    train_embedding = TRAIN_EMBEDDING if train_embedding is None else train_embedding
    check_settings(steps, learning_rate, batch_size, top_k)
    _check_layout(layout)
    start = dict(start or {})
    report = DistillReport(
        method, len(samples), 0, steps=steps, learning_rate=learning_rate, batch_size=batch_size, top_k=top_k
    )
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    batches = _make_batches(samples, batch_size)
    if not batches:
        raise DistillError("DWQ needs text calibration prompts (every prompt given has media)")
    report.tokens = sum(b.ids.size for b in batches)
    floats = {k: v for k, v in start.items() if not _is_packed(k, start)}
    if floats:
        model.load_weights(list(floats.items()), strict=False)

    def start_of(path: str) -> Mapping[str, mx.array] | None:
        keys = [f"{path}.{leaf}" for leaf in ("weight", "scales", "biases")]
        return (
            dict(zip(("weight", "scales", "biases"), (start[k] for k in keys), strict=True))
            if all(k in start for k in keys)
            else None
        )

    lm, cfg = model.language_model, model.config.text
    planned = [p for p, s in layout.items() if s is not None and p.startswith("language_model.")]
    for path, s in layout.items():
        if s is not None and path not in planned:
            report.skipped[path] = "RTN (DWQ trains the text model only)"
    to_float32 = lambda m: m.update(tree_map(lambda a: a.astype(mx.float32), m.parameters()))  # noqa: E731
    # the teacher, one layer at a time; each layer becomes its student form once its outputs are in
    to_float32(lm.embed_tokens)
    hs = [lm.embed(b.ids) for b in batches]
    mx.eval(hs)
    for i, layer in enumerate(lm.layers):
        to_float32(layer)
        masks = {
            n: attention_mask(None, n, cfg.sliding_window if cfg.layer_types[i] == SLIDING else None)
            for n in {b.ids.shape[1] for b in batches}
        }
        hs = [layer(h, masks[h.shape[1]])[0] for h in hs]
        mx.eval(hs)
        prefix = f"language_model.layers.{i}."
        _quantize_into(model, [p for p in planned if p.startswith(prefix)], layout, start_of, dtype_of)
        if log:
            log(f"teacher layer {i + 1}/{len(lm.layers)}")
    to_float32(lm.norm)
    hs = [lm.norm(h) for h in hs]
    # the approximation check: the first prompt's full-vocabulary teacher (1 MB per token)
    first = _head(model, hs[0][:1], None)
    mx.eval(first)
    for b, h in zip(batches, hs, strict=True):
        _teacher_targets(model, b, h, top_k)
        report.vocab.append(int(b.vocab.size))
    del hs
    _quantize_into(model, [p for p in planned if ".layers." not in p], layout, start_of, dtype_of)
    model.freeze()
    for path in planned:
        if train_embedding or ".layers." in path:
            _get(model, path).unfreeze(keys=["ds", "db"], recurse=False)
            report.trained.append(path)

    b0 = batches[0]
    before = _first_kl(model, b0, first)
    if log:
        log(f"first prompt's KL: restricted {before[0]:.4f}, full vocabulary {before[1]:.4f}")

    def loss_fn(b: _Batch) -> mx.array:
        return _kl(b.target, _student_logits(model, b.ids, b.vocab, checkpoint))

    opt = optim.Adam(optim.cosine_decay(learning_rate, max(steps, 1)))
    step = nn.value_and_grad(model, loss_fn)
    for k in range(steps):
        b = batches[k % len(batches)]
        loss, grads = step(b)
        opt.update(model, grads)
        mx.eval(loss, model.trainable_parameters(), opt.state)
        report.losses.append(float(loss))
        if log:
            log(f"DWQ step {k + 1}/{steps}: KL {report.losses[-1]:.4f}")
    after = _first_kl(model, b0, first)
    report.restricted_kl, report.full_kl = (before[0], after[0]), (before[1], after[1])
    del first

    out: dict[str, mx.array] = {k: v for k, v in floats.items() if k.rpartition(".")[0] not in planned}
    for path in planned:
        w, scales, biases = _get(model, path).affine()
        dtype = dtype_of(f"{path}.weight")
        out.update(
            {
                f"{path}.weight": w,
                f"{path}.scales": scales.astype(dtype),
                f"{path}.biases": biases.astype(dtype),
            }
        )
    mx.eval(out)
    report.seconds = time.perf_counter() - t0
    report.peak_bytes = mx.get_peak_memory()
    return out, set(planned), report


def _is_packed(name: str, replacements: Mapping[str, mx.array]) -> bool:
    """A quantized triple's part (its module also has `scales` in `replacements`)."""
    path = name.rpartition(".")[0]
    return f"{path}.scales" in replacements
