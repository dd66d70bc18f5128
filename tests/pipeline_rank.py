"""One rank of a pipeline test (run by tests/test_distributed.py with MLX's ring environment).

`python pipeline_rank.py SPEC.json`: SPEC holds the checkpoint, the layer split, the work rank 0
does and where to write what it saw (`<out>/rank<r>.json`). Followers report their parameters
before they serve rank 0.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gemma_mlx import ChatSession, generate, load_drafter
from gemma_mlx.distributed import Stage, load_stage
from gemma_mlx.generate import prefill
from gemma_mlx.processor import Processor


def param_report(module) -> dict:
    params = tree_flatten(module.parameters())
    return {"params": int(sum(v.size for _, v in params)), "names": sorted(k for k, _ in params)}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    group = mx.distributed.init(strict=True, backend="ring")
    rank = group.rank()
    model = load_stage(
        spec["checkpoints"][rank],
        group,
        layers_per_rank=spec.get("layers_per_rank"),
        timeout=spec.get("timeout"),
    )
    report = {"rank": rank, **param_report(model), "indices": [model.indices.start, model.indices.stop]}
    link = model._link if isinstance(model, Stage) else model.link
    timeline = link.events = [] if spec.get("timeline") else None
    if isinstance(model, Stage):
        (out / f"rank{rank}.json").write_text(json.dumps(report))
        model.follow()
        if timeline is not None:
            (out / f"rank{rank}.json").write_text(json.dumps({**report, "timeline": timeline}))
        return
    processor = Processor.from_dir(spec["checkpoints"][0])
    for task in spec["tasks"]:
        kind = task["kind"]
        if kind == "logits":
            cache = model.make_cache()
            ids = task["ids"]
            first = model(mx.array([ids[:-3]]), cache)
            rest = [model(mx.array([[t]]), cache) for t in ids[-3:]]
            logits = mx.concatenate([first, *rest], axis=1)
            report["logits"] = np.array(logits.astype(mx.float32)).tolist()
        elif kind == "generate":
            kwargs = dict(task.get("kwargs", {}))
            if "drafter" in kwargs:
                kwargs["drafter"] = load_drafter(kwargs["drafter"])
            r = generate(model, processor, task["prompt"], **kwargs)
            report[task["name"]] = {
                "tokens": r.tokens,
                "drafted": r.stats.drafted,
                "accepted": r.stats.accepted,
            }
        elif kind == "chat":
            chat = ChatSession(model, processor, max_tokens=task["max_tokens"])
            turns = []
            for text in task["turns"]:
                tokens = [c.token for c in chat.send(text)]
                turns.append({"tokens": tokens, "cached": chat.stats.cached_prompt_tokens})
            report["chat"] = turns
        elif kind == "prefill":  # chunked prefill of all but 3 tokens, then those one by one
            inputs = processor.prepare(task["prompt"])
            ids, cache, ends = mx.array(inputs.ids), model.make_cache(), []
            if timeline is not None:
                timeline.clear()
            media = inputs.model_kwargs() or None
            progress = lambda done, n, ends=ends: ends.append((done, time.time()))  # noqa: E731
            prefill(model, ids[:-3], cache, media=media, step=task["step"], progress=progress)
            local = [digest(cache[i].state) for i in range(model.indices.start, model.indices.stop)]
            logits = mx.concatenate(
                [model(ids[None, i : i + 1], cache) for i in range(ids.size - 3, ids.size)], axis=1
            )
            report[task["name"]] = {
                "ends": ends,
                "local_cache": local,
                "logits": np.array(logits.astype(mx.float32)).tolist(),
                "timeline": list(timeline or []),
            }
        elif kind == "prefill_fails":  # a progress callback raises mid-prefill; the ring goes on

            def fail(done, n, step=task["step"]):
                if done > step:
                    raise KeyError("stop")

            try:
                prefill(model, mx.array(task["prompt"]), model.make_cache(), step=task["step"], progress=fail)
            except KeyError:
                report["prefill_failed"] = True
        elif kind == "server":
            report["server"] = serve_requests(model, processor, task["requests"])
        elif kind == "forever":  # generate until killed; tell the test when decoding runs
            for i, _ in enumerate(generate_stream(model, processor)):
                if i == 5:
                    (out / "decoding").write_text("yes")
    report["bytes_sent"] = model.link.bytes_sent
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    model.close()


def digest(state) -> str:
    """Hash of a (float) layer cache's keys and values up to its offset (ring: its filled slots)."""
    k, v, offset = state
    h = hashlib.sha256(str(offset).encode())
    for a in (k, v):
        h.update(np.array(a[:, :, : min(offset, a.shape[2])].astype(mx.float32)).tobytes())
    return h.hexdigest()


def serve_requests(model, processor, requests: list[dict]) -> list[dict]:
    """Post each request to the OpenAI server in order -> its answer text and usage. An assistant
    message "ANSWER" stands for the previous request's answer."""
    from fastapi.testclient import TestClient

    from gemma_mlx.server import create_app

    out = []
    # the server accepts Host names of loopback and IP addresses only (TestClient says "testserver")
    with TestClient(create_app(model, processor, model_id="t"), base_url="http://localhost") as client:
        for body in requests:
            answer = out[-1]["text"] if out else ""
            messages = [{**m, "content": answer} if m["content"] == "ANSWER" else m for m in body["messages"]]
            body = {**body, "messages": messages}
            r = client.post("/v1/chat/completions", json={"model": "t", **body}).json()
            out.append({"text": r["choices"][0]["message"]["content"], "usage": r["usage"]})
    return out


def generate_stream(model, processor):
    from gemma_mlx import stream_generate

    return stream_generate(model, processor, [5, 6, 7], max_tokens=100_000)


if __name__ == "__main__":
    main()
