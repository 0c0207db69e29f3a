"""`qat`: quantization-aware training distilled from the float model (the Gemma 3 report's recipe).

The student is the float model with torchao fake quantization (`fake_quant.prepare`: every linear and
the tied embedding / LM head); the teacher is the frozen float model. The loss is KL(teacher || student)
over every position's next-token distribution: over the whole vocabulary, or, with `top_k`, over the
teacher's k most likely tokens (both renormalised there; the student's logits are then computed for
those k rows of the LM head only). AdamW, linear warm-up then cosine decay to 10 %, gradient clipping.

Interruptions: `OUT/training/state.pt` (student, optimizer, step, RNG, data position, loss history) is
written every `save_every` steps; `resume=True` continues it on the same loss curve.
Scale-out: under `torchrun` (WORLD_SIZE > 1) each decoder layer and the root are sharded with FSDP2
(`fully_shard`, gloo on CPU); every rank takes its slice of each global batch.

The output folder is a checkpoint the exporters read with `--checkpoint DIR`: `config.json` and
`model.safetensors` (Hugging Face names, the dequantized on-grid weights), `tokenizer.model`,
`quantization.json` + `quantization/codes.safetensors` (the integer codes and scales, see fake_quant.py)
and `qat.json` (settings, loss curve, speed, memory).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import fake_quant
from .config import Gemma3Config, preset
from .errors import UserError

STATE = Path("training") / "state.pt"


class Distiller(nn.Module):
    """The student's logits for the loss: all of them, or only at the teacher's top-k token ids."""

    def __init__(self, student: nn.Module):
        super().__init__()
        self.student = student

    def forward(self, tokens: Tensor, ids: Tensor | None = None) -> Tensor:
        if ids is None:
            return self.student(tokens)  # [B, T, V]
        h = self.student.model(tokens)  # [B, T, D]
        head = self.student.lm_head  # FakeQuantizedLinear; its weight is the embedding's
        if head.activation_fake_quantizer is not None:
            h = head.activation_fake_quantizer(h)
        rows = head.weight[ids]  # [B, T, k, D]; scales are per row, so quantizing rows is exact
        rows = head.weight_fake_quantizer(rows.flatten(0, 2)).view(rows.shape)
        # einsum returns a view; FSDP2 warns about views leaving a root module (a [B, T, k] copy is cheap)
        return torch.einsum("btd,btkd->btk", h, rows).clone()  # [B, T, k]


def kl_divergence(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over positions of KL(teacher || student), each distribution normalised over the last dim."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def distill_metrics(teacher: nn.Module, student: nn.Module, tokens: Tensor) -> dict[str, float]:
    """KL(teacher || student) and top-1 agreement over every position of `tokens` [N, T], and both
    models' perplexity of the text itself (next-token, teacher-forced); one sequence at a time."""
    kl, agree, nll_t, nll_s, n = 0.0, 0.0, 0.0, 0.0, 0
    for row in tokens:
        t, s = teacher(row[None])[0].float(), student(row[None])[0].float()  # [T, V]
        kl += float(kl_divergence(t, s)) * len(row)
        agree += float((t.argmax(-1) == s.argmax(-1)).float().sum())
        target = row[1:]
        nll_t += float(torch.nn.functional.cross_entropy(t[:-1], target, reduction="sum"))
        nll_s += float(torch.nn.functional.cross_entropy(s[:-1], target, reduction="sum"))
        n += len(row)
    m = n - len(tokens)  # predicted positions
    return {"kl": kl / n, "top1": agree / n, "ppl_teacher": math.exp(nll_t / m), "ppl_student": math.exp(nll_s / m)}


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10 % of `lr` at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def qat(
    model: str,
    scheme: str,
    steps: int,
    out: str | Path,
    checkpoint: str | None = None,
    random_weights: bool = False,
    data: list[str] | str | None = None,
    self_generated: bool = False,
    samples: int | None = None,
    lr: float = 2e-5,
    warmup_steps: int | None = None,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    resume: bool = False,
    top_k: int | None = None,
    save_every: int = 50,
    grad_clip: float = 1.0,
    activation_checkpointing: bool = False,
    freeze_embedding: bool = False,
    data_cache: str | Path | None = None,
    log: Callable[[str], None] = print,
    callback: Callable[[int, float], None] | None = None,
) -> Path:
    """Train `scheme`'s fake-quantized student towards the float model; write the checkpoint to `out`.

    `data`: text or JSONL files; without it (or with `self_generated`) `samples` sequences are sampled
    from the teacher (default min(steps * batch_size, 256)) and cached in `data_cache` (default OUT/data).
    `freeze_embedding`: the tied embedding / LM head stays fake-quantized but is not trained (no
    gradient or AdamW state for it: 2 GB less for 270M; on one process it is shared with the teacher).
    `callback(step, loss)` runs after every step (tests use it to interrupt a run)."""
    sch = fake_quant.qat_scheme(scheme)
    data = [data] if isinstance(data, (str, Path)) else data
    _check_args(preset(model), steps, seq_len, batch_size, top_k, save_every, lr, data, self_generated)
    out = Path(out)
    rank, world = _init_distributed(batch_size)
    say = log if rank == 0 else (lambda *_: None)
    state_path = _check_state(out, resume)

    from .load import load_model
    from .qat_data import read_texts

    texts = read_texts(data) if data else None  # bad data stops us before the model loads
    loaded = load_model(model, checkpoint=checkpoint, random_weights=random_weights, log=say)
    teacher = loaded.model.eval().requires_grad_(False)
    tokens, data_info = _data(loaded, model, data, texts, samples or min(steps * batch_size, 256), seq_len, seed,
                              Path(data_cache) if data_cache else out / "data", rank, say)
    student = _student(teacher, sch, freeze_embedding, share=world == 1)
    if activation_checkpointing:
        _checkpoint_layers(student)
    distiller = Distiller(student)
    if world > 1:
        _shard(distiller, teacher)
    trained = [p for p in distiller.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    settings = {"model": model, "scheme": sch.name, "seq_len": seq_len, "batch_size": batch_size, "top_k": top_k,
                "seed": seed, "freeze_embedding": freeze_embedding, "data": data_info, "config": loaded.model.config.to_hf()}
    start, history = 0, []
    if resume:
        start, history = _load_state(state_path, distiller, opt, settings, say)
    from .qat_data import Batches

    warmup = warmup_steps if warmup_steps is not None else min(10, max(1, steps // 10))
    say(f"QAT {model} {sch.name}: steps {start + 1}..{steps}, batch {batch_size} x {seq_len} tokens"
        f"{f' on {world} ranks' if world > 1 else ''}, KL over {'top-' + str(top_k) if top_k else 'all'} logits")
    loop = _Loop(distiller, teacher, opt, Batches(tokens, batch_size, seed), state_path, settings, rank, world)
    train_time = loop.run(start, steps, history, lr, warmup, top_k, grad_clip, save_every, say, callback)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # training peak (before the write)
    full = _full_state(distiller)  # single process: the student's own tensors, no copy
    config = loaded.model.config
    del opt, teacher, distiller, student, loop
    loaded.model = None  # the write below needs neither the teacher nor the optimizer
    if rank == 0:
        summary = {**settings, "steps": steps, "lr": lr, "warmup_steps": warmup, "grad_clip": grad_clip,
                   "world_size": world, "history": history, "weights": loaded.source,
                   "tokens_per_s": (steps - start) * batch_size * seq_len / max(train_time, 1e-9),
                   "peak_rss_bytes_rank0": peak}
        write_checkpoint(out, config, _strip(full, "student."), sch, loaded.tokenizer, summary)
        say(f"wrote {out} ({sch.name}; final kl {history[-1]['loss']:.5f})" if history else f"wrote {out}")
    if world > 1:
        dist.barrier()
    return out


def _check_state(out: Path, resume: bool) -> Path:
    path = out / STATE
    if resume and not path.exists():
        raise UserError(f"There is no training state at {path} to resume; run without --resume.")
    if not resume and path.exists():
        raise UserError(f"{out} already holds a training state; pass --resume to continue it, or choose another --out.")
    return path


def _student(teacher: nn.Module, scheme, freeze_embedding: bool, share: bool) -> nn.Module:
    """The fake-quantized copy of the teacher; a frozen embedding is the teacher's own Parameter if `share`."""
    weight = teacher.model.embed_tokens.weight
    memo = {id(weight): weight} if freeze_embedding and share else {}
    student = fake_quant.prepare(copy.deepcopy(teacher, memo), scheme).requires_grad_(True).train()
    if freeze_embedding:
        student.model.embed_tokens.weight.requires_grad_(False)
    return student


def _check_args(config: Gemma3Config, steps, seq_len, batch_size, top_k, save_every, lr, data, self_generated) -> None:
    if data and self_generated:
        raise UserError("Use either --data or --self-generated, not both.")
    if steps < 1 or batch_size < 1 or save_every < 1 or lr <= 0:
        raise UserError("--steps, --batch-size and --save-every must be at least 1 and --lr positive.")
    if not 2 <= seq_len <= config.max_position_embeddings:
        raise UserError(f"--seq-len must be between 2 and {config.max_position_embeddings}.")
    if top_k is not None and not 1 <= top_k <= config.vocab_size:
        raise UserError(f"--top-k must be between 1 and the vocabulary size {config.vocab_size}.")


def _data(loaded, model, data, texts, samples, seq_len, seed, cache_dir, rank, say) -> tuple[Tensor, dict]:
    from .qat_data import self_generated, text_data

    if data:
        return text_data(data, loaded.tokenizer, seq_len, texts)
    generate = functools.partial(self_generated, loaded.model, loaded.tokenizer, samples, seq_len, seed,
                                 cache_dir, f"{model}: {loaded.source}", log=say)
    if rank == 0:
        result = generate()
    if dist.is_initialized():
        dist.barrier()  # rank 0 sampled and cached; the others read the cache
    return result if rank == 0 else generate()


class _Loop:
    """The training steps of one run: batches, learning rate, progress lines, periodic states."""

    def __init__(self, distiller, teacher, opt, batches, state_path: Path, settings: dict, rank: int, world: int):
        self.distiller, self.teacher, self.opt, self.batches = distiller, teacher, opt, batches
        self.state_path, self.settings, self.rank, self.world = state_path, settings, rank, world

    def run(self, start, steps, history, lr, warmup, top_k, grad_clip, save_every, say, callback) -> float:
        """Steps `start`..`steps` (appending to `history`); returns the seconds spent in them."""
        b, seq_len = self.settings["batch_size"], self.settings["seq_len"]
        local = b // self.world
        spent = 0.0
        for step in range(start, steps):
            t0 = time.perf_counter()
            batch = self.batches(step)[self.rank * local : (self.rank + 1) * local]  # [local, T]
            for group in self.opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            loss, norm = _train_step(self.distiller, self.teacher, self.opt, batch, top_k, grad_clip, self.world)
            dt = time.perf_counter() - t0
            spent += dt
            history.append({"step": step + 1, "loss": loss, "lr": self.opt.param_groups[0]["lr"], "grad_norm": norm,
                            "tokens_per_s": b * seq_len / dt})
            if steps <= 50 or (step + 1) % max(1, steps // 50) == 0 or step + 1 == steps:
                say(f"step {step + 1}/{steps}  kl {loss:.5f}  lr {history[-1]['lr']:.2e}  grad-norm {norm:.3f}  "
                    f"{history[-1]['tokens_per_s']:.0f} tok/s")
            if (step + 1) % save_every == 0 or step + 1 == steps:
                _save_state(self.state_path, self.distiller, self.opt, step + 1, history, self.settings,
                            self.batches.position(step + 1), self.rank)
            if callback is not None:
                callback(step + 1, loss)
        return spent


def _train_step(distiller, teacher, opt, batch, top_k, grad_clip, world) -> tuple[float, float]:
    with torch.no_grad():
        t_logits = teacher(batch)  # [b, T, V]
        if world > 1:
            teacher.reshard()  # the root (embedding) too: the teacher has no backward
        ids = None
        if top_k:
            t_logits, ids = t_logits.topk(top_k, dim=-1)  # [b, T, k]
    loss = kl_divergence(t_logits, distiller(batch, ids))
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in distiller.parameters() if p.requires_grad], grad_clip)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = loss.detach().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value), float(norm)


# -- scale-out ------------------------------------------------------------------------------------


def _init_distributed(batch_size: int) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} must be a multiple of the {world} ranks.")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), world


def _shard(distiller: Distiller, teacher: nn.Module) -> None:
    """FSDP2: each decoder layer is one group, the root (embedding = LM head, final norm) another."""
    from torch.distributed.fsdp import fully_shard

    for model, root in ((distiller.student, distiller), (teacher, teacher)):
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(root)


def _checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer (its fake-quantized weights too) in backward instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# -- training state -------------------------------------------------------------------------------


def _full_state(distiller: nn.Module) -> dict[str, Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(distiller, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_state(path: Path, distiller, opt, step, history, settings, position, rank) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(distiller, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model_sd, "optimizer": optim_sd, "step": step, "history": history,
                    "settings": settings, "data_position": position, "rng": torch.get_rng_state()}, tmp)
        tmp.replace(path)  # an interruption mid-save leaves the previous state
    if dist.is_initialized():
        dist.barrier()


def _load_state(path: Path, distiller, opt, settings: dict, say) -> tuple[int, list[dict]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path, weights_only=False)
    saved = state["settings"]
    if saved["config"] != settings["config"]:
        c = Gemma3Config.from_hf(saved["config"])
        raise UserError(f"The training state in {path} is for a {c.num_hidden_layers}-layer model of width "
                        f"{c.hidden_size}, not this --model {settings['model']}; choose another --out.")
    changed = [k for k in ("scheme", "seq_len", "batch_size", "top_k", "seed", "freeze_embedding")
               if saved.get(k) != settings[k]]
    if saved["data"]["fingerprint"] != settings["data"]["fingerprint"]:
        changed.append("data")
    if changed:
        raise UserError(f"The training state in {path} was made with other {', '.join(changed)}; "
                        "resume with the same settings or choose another --out.")
    set_state_dict(distiller, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(state["rng"])
    say(f"resumed {path} at step {state['step']} (data position {state['data_position']})")
    return state["step"], state["history"]


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- the checkpoint the exporters read ------------------------------------------------------------


def write_checkpoint(out: Path, config: Gemma3Config, state: dict[str, Tensor], scheme, tokenizer, summary: dict) -> None:
    """Hugging Face folder of the dequantized on-grid weights + the grid + the training summary.
    `state` (the master weights) is overwritten in place with the dequantized values."""
    from .model import Gemma3ForCausalLM
    from .weights import load_strict, save_hf_folder

    with torch.device("meta"):  # takes `state`'s tensors as its parameters: no second copy
        master = Gemma3ForCausalLM(config)
    load_strict(master, {k: v.float() for k, v in state.items()}, "the QAT state")
    g = fake_quant.grid(master, scheme)
    with torch.no_grad():
        params = dict(master.named_parameters())
        for name in g.codes:
            params[name].copy_(g.dequantize(name))
    out.mkdir(parents=True, exist_ok=True)
    save_hf_folder(master, out)
    # to_hf() drops embed_scale_dtype; from_hf reads it back, so a GGUF-born model keeps its fp32 scale.
    hf = {**config.to_hf(), "embed_scale_dtype": config.embed_scale_dtype}
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    tokenizer.save(out / "tokenizer.model")
    (out / "qat.json").write_text(json.dumps(summary, indent=2))
    fake_quant.write_grid(g, out, extra={"weights_file": "model.safetensors holds exactly these values, dequantized"})


# -- memory plan ----------------------------------------------------------------------------------

GiB = 1024**3


def memory_plan(
    model: str,
    ranks: int = 1,
    seq_len: int = 128,
    batch_size: int = 1,
    top_k: int | None = 256,
    activation_checkpointing: bool = True,
    freeze_embedding: bool = False,
) -> dict[str, float]:
    """Estimated peak bytes per rank of `qat` for `model` under FSDP2 on `ranks` ranks (fp32 throughout;
    `batch_size` per rank), by term. See docs/qat.md; each term is an upper-bound style estimate."""
    c = preset(model)
    D, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = D * (q + 2 * kv) + q * D + 3 * D * I + 4 * D + 2 * c.head_dim  # params of one decoder layer
    E = V * D
    P = E + L * layer + D
    N, BT, f = ranks, batch_size * seq_len, 4
    trained = P - E if freeze_embedding else P
    student = P - E if freeze_embedding and N == 1 else P  # one process: a frozen embedding is the teacher's
    sharded = f * (P + student + 3 * trained) / N  # teacher, student, grads + AdamW m, v of what is trained
    gathered = 0 if N == 1 else f * (E + 2 * layer) * 2  # student root + 2 layers in flight; teacher the same
    emb_grad = 0 if N == 1 or freeze_embedding else f * E  # the root's unsharded gradient before reduce-scatter
    one_layer = BT * (10 * D + 3 * I + 2 * (q + 2 * kv)) * f + 2 * batch_size * c.num_attention_heads * seq_len**2 * f
    fq_weights = f * layer * (2 if activation_checkpointing else L)  # fake-quantized copies saved for backward
    acts = (L * BT * D * f + one_layer) if activation_checkpointing else L * one_layer
    k = top_k or V
    head = BT * V * f * 2 + (BT * k * D * f * 3 if top_k else BT * V * f * 3 + f * E)
    optim_tmp = 2 * f * (D * I if freeze_embedding else E) / N  # foreach=False: temporaries of the largest tensor
    runtime = 0.3 * GiB  # the interpreter with torch, torchao and this package imported (measured)
    parts = {"runtime": runtime, "sharded_state": sharded, "gathered_params": gathered, "embedding_grad": emb_grad,
             "fake_quant_weights": fq_weights, "activations": acts, "logits": head, "optimizer_temp": optim_tmp}
    parts["total"] = sum(parts.values())
    return parts


def memory_table(models=("1b", "4b", "12b", "27b"), ranks=(1, 2, 4, 8, 16), **kw) -> str:
    """A markdown table of `memory_plan(...)["total"]` in GiB per rank."""
    lines = ["| model | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}" for n in ranks) + " |",
             "|---|" + "---|" * len(ranks)]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{memory_plan(m, n, **kw)['total'] / GiB:.1f}" for n in ranks) + " |")
    return "\n".join(lines)
