"""Concurrent streaming clients: `gemma-mlx serve` against `mlx_lm.server`, same weights, one run.

Full matrix (issue 23, after batching lands; an hour or more on the loaded 2-core CPU):

    python benchmarks/concurrency.py --concurrency 1,2,4,8 --rounds 3 --arrival \\
        --out benchmarks/results/concurrency_gemma3_270m_cpu

Smoke run (proves the harness end to end; about 10 minutes on the loaded 2-core CPU):

    nice -n 10 python benchmarks/concurrency.py --concurrency 1,2 --rounds 1 --arrival \\
        --arrival-decode-tokens 48 --arrival-prompt-tokens 600 --label "serial server, before batching" \\
        --out benchmarks/results/concurrency_serial_smoke_gemma3_270m_cpu

Both servers run as subprocesses on loopback for the whole run and serve the same directory: the
offline default Gemma 3 270M (float32; mlx-lm loads our converted directory as it is) or `--model`.
Ours is started with `--max-concurrency N` (N = the largest `--concurrency`) when `gemma-mlx serve
--help` lists that flag, else it is the serial server and every table says so. mlx-lm batches by
itself (its `BatchGenerator`) whenever a request is batchable: no draft model, no `--kv-bits`, no
`seed` in the request, no image; this script sends none. Its flags that matter, set here:
`--decode-concurrency` (rows decoded together, default 32; here N), `--prompt-concurrency` (prompts
prefilled together, default 8) and `--prefill-step-size` (prefill chunk, default 2048; here
`--prefill-chunk`, ours' chunk, 512).

1. Concurrency: at each level c, `--rounds` rounds; in each round the servers take turns
   (ours, mlx-lm; the next round mlx-lm first), and c threads submit one streamed greedy chat
   request each at the same instant (distinct prompts that differ from their first word, so no
   prefix cache helps), `--max-tokens` tokens each. Per request: TTFT (submission to the first
   content token), generated tokens (the server's usage), end time. Per level and server:
   aggregate tok/s = all generated tokens / (last completion - first submission) (median over
   rounds), p50/p95 TTFT over all requests of all rounds, and whether the two servers' greedy
   answers agree.
2. `--arrival`: 3 clients decode long answers (`--arrival-decode-tokens`); once each has streamed
   a few tokens a 4th request with a long prompt (`--arrival-prompt-tokens`) arrives. Its TTFT
   against the TTFT of another text of the same length sent alone to the idle server (its own
   prefill); issue 23's goal: within that plus one prefill chunk (the alone time scaled linearly:
   x (arriving prompt tokens + chunk) / alone prompt tokens). Also the longest pause of the
   running streams while it waits (issue 23: a long prompt never stalls them beyond one chunk)
   and how many of them were still running when it got its first token (else it proves nothing).

Writes OUT.json (every request) and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path.home() / ".cache" / "gemma-mlx" / "gemma-3-270m-float32"
TOPICS = [
    "a lighthouse keeper",
    "a lost umbrella",
    "the first snow of winter",
    "a robot learning to paint",
    "a market in Marrakesh",
    "a cat who hates Mondays",
    "an old violin",
    "a train that never stops",
    "a garden on the moon",
    "the last bookshop in town",
    "a dragon afraid of fire",
    "a letter found in a wall",
]
OPENERS = ["Please", "Kindly", "Now", "Today", "Quickly", "Briefly", "Simply", "Gently"]


# --- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_help() -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gemma_mlx.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"},
    )
    return out.stdout + out.stderr


def our_prefill_chunk(help_text: str) -> tuple[int, str | None]:
    """(our server's prefill chunk, the `serve` flag that sets it or None): the worker's default
    (512 where it cannot be read)."""
    flag = next((f for f in ("--prefill-step-size", "--prefill-chunk") if f in help_text), None)
    try:
        import inspect

        from gemma_mlx.server.worker import Worker

        return int(inspect.signature(Worker.__init__).parameters["prefill_step_size"].default), flag
    except (ImportError, KeyError, TypeError, ValueError):
        return 512, flag


@dataclass
class Server:
    name: str
    argv: list[str]
    model_id: str
    log: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [*self.argv, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-2000:]
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"{self.name} did not answer within {timeout:.0f} s (log: {self.log})")

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (Linux /proc; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def wait_idle(self, timeout: float = 600.0) -> float:
        """Wait until the server uses under 20 % of a core (a hung-up stream may still be
        generating): the next measurement, maybe of the other server, must not share the CPU with
        it. Returns the seconds waited (0 where CPU time cannot be read)."""
        start = time.monotonic()
        before = self.cpu_seconds()
        while before is not None and time.monotonic() - start < timeout:
            time.sleep(1.0)
            now = self.cpu_seconds()
            if now is None or now - before < 0.2:
                break
            before = now
        return time.monotonic() - start

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def settle(servers: list[Server]) -> None:
    for s in servers:
        waited = s.wait_idle()
        if waited > 3:
            print(f"({s.name} was busy for {waited:.0f} s after the last measurement)", flush=True)


def make_servers(args, help_text: str, peak: int, chunk: int, logs: Path) -> tuple[list[Server], str]:
    ours = [sys.executable, "-m", "gemma_mlx.cli", "serve", "--model", str(args.model)]
    ours += ["--host", "127.0.0.1", "--no-ui", "--max-queue", "256"]
    if "--max-concurrency" in help_text:
        ours += ["--max-concurrency", str(peak)]
        mode = f"batched (--max-concurrency {peak})"
    else:
        mode = "serial (this gemma-mlx serve has no --max-concurrency: one request at a time)"
    flag = our_prefill_chunk(help_text)[1]
    if flag:
        ours += [flag, str(chunk)]
    peer = [sys.executable, "-m", "mlx_lm.server", "--model", str(args.model), "--host", "127.0.0.1"]
    peer += ["--decode-concurrency", str(peak), "--prompt-concurrency", str(args.peer_prompt_concurrency)]
    peer += ["--prefill-step-size", str(chunk), "--log-level", "WARNING"]
    servers = [
        Server("gemma-mlx", ours, args.model.name, logs / "gemma-mlx.log"),
        Server("mlx-lm", peer, "default_model", logs / "mlx-lm.log"),
    ]
    return [s for s in servers if s.name in args.servers], mode


# --- clients -----------------------------------------------------------------------------------


@dataclass
class Result:
    server: str
    prompt: str
    submit: float  # perf_counter
    first: float | None = None
    end: float | None = None
    tokens: int = 0  # the server's usage.completion_tokens (content chunks where it sends none)
    chunks: int = 0
    prompt_tokens: int | None = None
    text: str = ""
    stamps: list[float] = field(default_factory=list)  # arrival of each content chunk
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.submit


def stream_chat(
    client: httpx.Client,
    server: Server,
    prompt: str,
    max_tokens: int,
    start: threading.Event | None = None,
    stop: threading.Event | None = None,
    publish: list | None = None,
) -> Result:
    """One streamed greedy chat request; `start` holds it until every client is ready, `stop`
    makes it hang up early (a disconnect); `publish` receives the result as it fills."""
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if start is not None:
        start.wait()
    r = Result(server.name, prompt, time.perf_counter())
    if publish is not None:
        publish.append(r)
    try:
        with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                r.error = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                return r
            for line in response.iter_lines():
                if stop is not None and stop.is_set():
                    break
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    r.tokens = chunk["usage"].get("completion_tokens") or r.tokens
                    r.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        now = time.perf_counter()
                        r.first = r.first or now
                        r.stamps.append(now)
                        r.chunks += 1
                        r.text += piece
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        r.error = repr(e)
    r.end = time.perf_counter()
    r.tokens = r.tokens or r.chunks
    return r


def burst(server: Server, prompts: list[str], max_tokens: int) -> list[Result]:
    """All prompts submitted at once, one thread and connection each."""
    results: list[Result | None] = [None] * len(prompts)
    start = threading.Event()

    def run(i: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(3600.0, connect=30.0)) as client:
            results[i] = stream_chat(client, server, prompts[i], max_tokens, start)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    time.sleep(0.2)  # every thread parked on the event
    start.set()
    for t in threads:
        t.join()
    return results  # type: ignore[return-value]


def prompts_for(level: int, round_: int, count: int) -> list[str]:
    """Distinct prompts from their first word on; the same list for both servers of a round."""
    out = []
    for i in range(count):
        k = (level * 7 + round_ * 3 + i) % len(TOPICS)
        opener = OPENERS[(i + round_) % len(OPENERS)]
        out.append(f"{opener} write story number {level}.{round_}.{i} about {TOPICS[k]}, in a few lines.")
    return out


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarise(runs: list[list[Result]]) -> dict:
    done = [r for run in runs for r in run if r.error is None and r.ttft is not None]
    rates = []
    for run in runs:
        ok = [r for r in run if r.error is None and r.end is not None]
        if ok:
            wall = max(r.end for r in ok) - min(r.submit for r in run)
            rates.append(sum(r.tokens for r in ok) / wall)
    ttfts = [r.ttft for r in done]
    return {
        "requests": sum(len(run) for run in runs),
        "failed": sum(r.error is not None for run in runs for r in run),
        "aggregate_tps": statistics.median(rates) if rates else float("nan"),
        "aggregate_tps_rounds": rates,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "tokens_mean": statistics.mean(r.tokens for r in done) if done else float("nan"),
    }


def concurrency_matrix(servers: list[Server], levels: list[int], rounds: int, max_tokens: int) -> dict:
    out = {}
    for level in levels:
        runs: dict[str, list[list[Result]]] = {s.name: [] for s in servers}
        for round_ in range(rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for s in order:
                settle(servers)
                results = burst(s, prompts_for(level, round_, level), max_tokens)
                runs[s.name].append(results)
                ttfts = [f"{r.ttft:.2f}" if r.ttft is not None else "-" for r in results]
                print(
                    f"c={level} round {round_} {s.name}: TTFT {' '.join(ttfts)} s, "
                    f"{sum(r.tokens for r in results)} tokens, "
                    f"errors {[r.error for r in results if r.error]}",
                    flush=True,
                )
        entry = {name: summarise(rs) for name, rs in runs.items()}
        if len(servers) == 2:
            a, b = (runs[s.name] for s in servers)
            pairs = [
                (x.text, y.text) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)
            ]
            # mlx-lm streams a final whitespace token that ours holds back: compare stripped
            entry["same_answers"] = [sum(x.strip() == y.strip() for x, y in pairs), len(pairs)]
        entry["requests"] = {name: [[asdict(r) for r in run] for run in rs] for name, rs in runs.items()}
        out[str(level)] = entry
    return out


# --- a request arriving while others decode ----------------------------------------------------


def passage(tokens: int, which: int) -> str:
    """A distinct stretch of Genesis (KJV) of roughly `tokens` tokens (4 characters a token)."""
    text = (ROOT / "benchmarks/data/genesis_kjv.txt").read_text()
    size = tokens * 4
    start = (which * 7919 * 13) % max(1, len(text) - size)
    return text[start : start + size]


def arrival_prompt(tokens: int, which: int) -> str:
    return f"Passage {which}. Summarise it in one sentence.\n\n{passage(tokens, which)}"


def arrival(server: Server, prompt_tokens: int, decode_tokens: int, round_: int, warm_tokens: int) -> dict:
    timeout = httpx.Timeout(3600.0, connect=30.0)
    base = 100 * round_ + 10 * (server.name == "mlx-lm")
    with httpx.Client(timeout=timeout) as client:
        alone = stream_chat(client, server, arrival_prompt(prompt_tokens, base + 1), 1)
    stop, start = threading.Event(), threading.Event()
    decoders: list[list[Result]] = [[], [], []]

    def decode(i: int) -> None:
        prompt = f"{OPENERS[i]} count from 1 to 1000 in words, one number per line (round {base + i})."
        with httpx.Client(timeout=timeout) as client:
            stream_chat(client, server, prompt, decode_tokens, start, stop, decoders[i])

    threads = [threading.Thread(target=decode, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    start.set()
    deadline = time.monotonic() + 3600
    # the 4th request comes once every decoder has streamed `warm_tokens` chunks (or ended)
    while time.monotonic() < deadline:
        if all(d and (d[0].chunks >= warm_tokens or d[0].end is not None) for d in decoders):
            break
        time.sleep(0.05)
    with httpx.Client(timeout=timeout) as client:
        late = stream_chat(client, server, arrival_prompt(prompt_tokens, base + 2), 8)
    stop.set()  # the decoders hang up: their rows should be freed
    for t in threads:
        t.join()
    running = [d[0] for d in decoders if d and d[0].stamps]
    t0, t1 = late.submit, late.first or late.end
    # running at its first token: streaming before it and not ended before it (a hang-up ends later)
    still = sum(1 for d in running if t1 and d.stamps[0] < t1 and (d.end is None or d.end > t1))
    gaps = []  # pauses of the running streams while the 4th request waited for its first token
    for d in running:
        gaps += [b - a for a, b in zip(d.stamps, d.stamps[1:], strict=False) if b > t0 and a < (t1 or b)]
    steady = []
    for d in running:
        pre = [s for s in d.stamps if s < t0]
        steady += [b - a for a, b in zip(pre, pre[1:], strict=False)]
    return {
        "alone": asdict(alone),
        "late": asdict(late),
        "decoders": [asdict(d[0]) for d in decoders if d],
        "alone_ttft": alone.ttft,
        "late_ttft": late.ttft,
        "prompt_tokens": late.prompt_tokens,
        "decoders_running_at_first_token": still,
        "longest_pause": max(gaps) if gaps else None,
        "step_before": statistics.median(steady) if steady else None,
    }


def arrival_runs(servers: list[Server], args, chunk: int) -> dict:
    out = {s.name: [] for s in servers}
    for round_ in range(args.rounds):
        for s in servers if round_ % 2 == 0 else servers[::-1]:
            settle(servers)
            r = arrival(s, args.arrival_prompt_tokens, args.arrival_decode_tokens, round_, 3)
            n, n_alone = r["prompt_tokens"], r["alone"]["prompt_tokens"]
            r["chunk"] = chunk
            # the alone prompt is another text of the same length in characters: scale its time
            # to the arriving prompt's tokens plus one chunk
            r["goal_s"] = (
                r["alone_ttft"] * (n + chunk) / n_alone if r["alone_ttft"] and n and n_alone else None
            )
            out[s.name].append(r)
            print(
                f"arrival round {round_} {s.name}: alone {fmt(r['alone_ttft'])} s, "
                f"arriving {fmt(r['late_ttft'])} s ({n} prompt tokens), "
                f"decoders running {r['decoders_running_at_first_token']}/3",
                flush=True,
            )
    return out


# --- report ------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("gemma-mlx", "mlx", "mlx-lm"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}",
        **versions,
    }


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    m, a = report["machine"], report["args"]
    names = a["servers"]
    lines = [
        "# Concurrent streaming clients: gemma-mlx serve vs mlx_lm.server",
        "",
        *([f"**{report['label']}**", ""] if report["label"] else []),
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']} (CPU backend); load average "
        f"{report['load_before']} before, {report['load_after']} after. gemma-mlx {m['gemma-mlx']}, "
        f"MLX {m['mlx']}, mlx-lm {m['mlx-lm']}.",
        "",
        f"Model: `{Path(a['model']).name}` (the same directory for both servers). "
        f"gemma-mlx: {report['mode']}. "
        f"mlx-lm: `{' '.join(report['peer_flags'])}` (batching on: no draft model, no --kv-bits, no seed).",
        "",
        f"{a['max_tokens']} greedy tokens per request (fewer where the model ends its answer), distinct "
        f"prompts, streamed over loopback, all clients submitting at once; {a['rounds']} round(s), servers "
        "alternating. "
        "Aggregate tok/s: generated tokens / (last completion - first submission), median of rounds; "
        "TTFT: submission to the first content token, percentiles over all requests.",
        "",
    ]
    matrix = report.get("concurrency") or {}
    if matrix:
        lines += [
            "| clients | server | aggregate tok/s | p50 TTFT (s) | p95 TTFT (s) | mean tokens | failed |",
            "|---|---|---|---|---|---|---|",
        ]
        for level, entry in matrix.items():
            for name in names:
                e = entry[name]
                lines.append(
                    f"| {level} | {name} | {fmt(e['aggregate_tps'])} | {fmt(e['ttft_p50'])} | "
                    f"{fmt(e['ttft_p95'])} | {fmt(e['tokens_mean'], 1)} | {e['failed']}/{e['requests']} |"
                )
        lines.append("")
        if len(names) == 2:
            ours, peer = names
            for level, entry in matrix.items():
                o, p = entry[ours], entry[peer]
                same, total = entry["same_answers"]
                lines.append(
                    f"- {level} client(s): {ours}/{peer} aggregate tok/s "
                    f"{fmt(o['aggregate_tps'] / p['aggregate_tps'])}x, "
                    f"p95 TTFT {fmt(o['ttft_p95'] / p['ttft_p95'])}x (< 1: ours sooner); "
                    f"identical answers {same}/{total}"
                )
        first = matrix.get("1", {}).get("gemma-mlx")
        four = matrix.get("4", {}).get("gemma-mlx")
        if first and four:
            lines.append(
                "- gemma-mlx aggregate tok/s at 4 clients / at 1: "
                f"{fmt(four['aggregate_tps'] / first['aggregate_tps'])}x "
                "(issue 23's goal on an overhead-bound model: >= 2x)"
            )
        lines.append("")
    arrivals = report.get("arrival") or {}
    if arrivals:
        lines += [
            "## A request arriving while 3 others decode",
            "",
            f"3 clients ask for {a['arrival_decode_tokens']}-token answers; once each has streamed 3 "
            f"tokens a 4th request with a ~{a['arrival_prompt_tokens']}-token prompt arrives. 'Alone': a "
            "prompt of the same length in characters (different text) sent to the idle server, max_tokens "
            "1. Goal: arriving TTFT <= alone TTFT x (arriving prompt tokens + chunk) / alone prompt tokens. "
            "Pause: the longest gap between two tokens of a running stream while the 4th request waited "
            "for its first token, against their median step before it arrived. A serial server serves "
            "the 3 answers one after the other (the 4th arrives during the last) and the 4th only after them "
            "(0/3 still running): no goal applies.",
            "",
            "| server | round | prompt tokens (alone) | chunk | TTFT alone (s) | TTFT arriving (s) "
            "| goal (s) | met | streams still running | longest pause (s) | step before (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in arrivals.items():
            for i, r in enumerate(runs):
                met = r["goal_s"] is not None and r["late_ttft"] is not None and r["late_ttft"] <= r["goal_s"]
                met_text = "yes" if met else "no"
                if not r["decoders_running_at_first_token"]:
                    met_text = "n/a: none running"  # it did not arrive while others decoded
                lines.append(
                    f"| {name} | {i} | {r['prompt_tokens']} ({r['alone']['prompt_tokens']}) | {r['chunk']} | "
                    f"{fmt(r['alone_ttft'])} | {fmt(r['late_ttft'])} | {fmt(r['goal_s'])} | {met_text} | "
                    f"{r['decoders_running_at_first_token']}/3 | {fmt(r['longest_pause'])} | "
                    f"{fmt(r['step_before'], 3)} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="checkpoint (default: the offline Gemma 3 270M)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="comma-separated client counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--servers", default="gemma-mlx,mlx-lm", help="which to run (comma-separated)")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill chunk (default: ours')")
    ap.add_argument("--peer-prompt-concurrency", type=int, default=8, help="mlx-lm --prompt-concurrency")
    ap.add_argument("--arrival", action="store_true", help="also the arriving-request measurement")
    ap.add_argument("--arrival-only", action="store_true", help="only the arriving-request measurement")
    ap.add_argument("--arrival-prompt-tokens", type=int, default=1536)
    ap.add_argument("--arrival-decode-tokens", type=int, default=256)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--label", default="", help="a line printed on top of the report")
    ap.add_argument("--from-json", type=Path, default=None, help="only rewrite OUT.md from this run's JSON")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/concurrency_gemma3_270m_cpu")
    args = ap.parse_args()
    if args.from_json is not None:
        args.out.with_suffix(".md").write_text(markdown(json.loads(args.from_json.read_text())) + "\n")
        return
    if args.model is None:
        if DEFAULT_MODEL.is_dir():
            args.model = DEFAULT_MODEL
        else:
            from gemma_mlx.convert.default_model import default_model_path

            args.model = default_model_path()
    args.model = args.model.resolve()
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not set(args.servers) <= {"gemma-mlx", "mlx-lm"} or not args.servers:
        ap.error(f"--servers {','.join(args.servers)}: expected gemma-mlx and/or mlx-lm")
    levels = [int(c) for c in args.concurrency.split(",")]
    if min(levels) < 1:
        ap.error("--concurrency: client counts must be >= 1")

    # a terminated run still stops its servers (the `finally` below)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    help_text = serve_help()
    default_chunk, _ = our_prefill_chunk(help_text)
    chunk = args.prefill_chunk or default_chunk
    peak = max(levels + ([4] if args.arrival or args.arrival_only else []))
    logs = Path(tempfile.mkdtemp(prefix="concurrency-logs-"))
    servers, mode = make_servers(args, help_text, peak, chunk, logs)
    report = {
        "label": args.label,
        "machine": machine(),
        "args": {**vars(args), "model": str(args.model), "out": str(args.out)},
        "mode": mode,
        "chunk": chunk,
        "peer_flags": next((s.argv[2:] for s in servers if s.name == "mlx-lm"), []),
        "load_before": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"gemma-mlx: {mode}; prefill chunk {chunk}; server logs in {logs}", flush=True)
    try:
        for s in servers:
            t = time.perf_counter()
            s.start(args.startup_timeout)
            burst(s, prompts_for(0, 99, peak), 4)  # warm-up: loading, compiling, every row count
            print(f"{s.name} up and warm in {time.perf_counter() - t:.1f} s (port {s.port})", flush=True)
        if not args.arrival_only:
            report["concurrency"] = concurrency_matrix(servers, levels, args.rounds, args.max_tokens)
        if args.arrival or args.arrival_only:
            report["arrival"] = arrival_runs(servers, args, chunk)
    finally:
        for s in servers:
            s.close()
    report["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
