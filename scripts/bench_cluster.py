"""Cluster benchmark (issue 15): N replicas behind HAProxy, C concurrent multi-turn conversations.

Starts ``scripts/cluster.sh`` on loopback (bench/cluster_process.py) and runs three phases, every
conversation taking one streaming turn per round (half of them stateless, resending the whole history;
half sending back their ``x-session-id``):

1. steady: ``--turns`` rounds without faults. A turn counts as *local* when the replica's
   ``x-sinkserve-session-source`` response header says ``local`` or, where the server does not send that
   header yet, when the same replica served the conversation's previous turn (routing affinity only).
2. remove: one replica is taken out (SIGTERM, held down); one round. The share of conversations that
   moved, and the time to first token of moved turns (resumed from the shared store, or re-prefilled
   where the server has no shared store) against turns that stayed.
3. add back: the replica restarts; one round. The share of conversations that moved again (HAProxy's
   stick table keeps them where they are: expected 0).
4. resume (``--probes``): on the idle cluster, one conversation at a time takes a turn on its replica
   and then the next straight on another replica, which loads it from the shared store: the extra time
   to first token of a resumed turn without the queueing of the concurrent phases.

Writes ``cluster.json`` and ``cluster.md`` to ``--out``.

    .venv/bin/python scripts/bench_cluster.py --tiny --out /tmp/bench-cluster          # quick check
    .venv/bin/python scripts/bench_cluster.py --out docs/results/cluster                # embedded model
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from bench.cluster_process import ClusterProcess

BAN_SPECIAL = {"0": -100, "1": -100, "2": -100}  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>


@dataclass
class Turn:
    conversation: int
    phase: str
    replica: str
    source: str | None  # x-sinkserve-session-source, when the server sends it
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int


@dataclass
class Conversation:
    index: int
    stateless: bool
    messages: list[dict] = field(default_factory=list)
    session_id: str | None = None
    replica: str | None = None


async def turn(client: httpx.AsyncClient, model: str, conv: Conversation, phase: str, max_tokens: int) -> Turn:
    conv.messages.append({"role": "user", "content": f"Conversation {conv.index}, question {len(conv.messages) // 2 + 1}: "
                                                     "tell me one more thing about lighthouses."})
    headers = {"X-Session-Id": conv.session_id} if conv.session_id and not conv.stateless else {}
    body = {"model": model, "messages": conv.messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": BAN_SPECIAL}
    start = time.perf_counter()
    ttft, text, usage = None, [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"conversation {conv.index}: HTTP {response.status_code}: {await response.aread()!r}")
        replica = response.headers.get("x-sinkserve-replica", "?")
        source = response.headers.get("x-sinkserve-session-source")
        conv.session_id = conv.session_id or response.headers.get("x-session-id")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(choice["delta"]["content"])
            usage = chunk.get("usage") or usage
    conv.messages.append({"role": "assistant", "content": "".join(text)})
    previous, conv.replica = conv.replica, replica
    if source is None and previous is not None:
        source = "same-replica" if previous == replica else "moved"
    details = usage.get("prompt_tokens_details") or {}
    return Turn(conv.index, phase, replica, source, ttft if ttft is not None else time.perf_counter() - start,
                usage.get("prompt_tokens", 0), details.get("cached_tokens", 0))


async def round_(client, model, conversations, phase, max_tokens) -> list[Turn]:
    return list(await asyncio.gather(*(turn(client, model, c, phase, max_tokens) for c in conversations)))


def share(turns: list[Turn], sources: tuple[str, ...]) -> float:
    counted = [t for t in turns if t.source is not None]
    return sum(t.source in sources for t in counted) / len(counted) if counted else float("nan")


def median_ms(values: list[float]) -> float | None:
    return round(1000 * statistics.median(values), 1) if values else None


async def resume_probes(cluster: ClusterProcess, model: str, conversations: list[Conversation],
                        max_tokens: int) -> list[Turn]:
    """4. resume: one conversation at a time on an idle cluster, a turn on its replica (its local copy) and
    then the next turn on another replica (which loads it from the shared store), both sent straight to
    the replica: the extra time to first token of a resumed turn, without the load of the other phases."""
    probes = []
    for conv in conversations:
        for phase, replica in (("probe-local", conv.replica),
                               ("probe-resumed", next(r for r in cluster.replica_ports if r != conv.replica))):
            url = f"http://127.0.0.1:{cluster.replica_ports[replica]}"  # both straight to a replica
            async with httpx.AsyncClient(base_url=url, timeout=600) as direct:
                probes.append(await turn(direct, model, conv, phase, max_tokens))
    return probes


async def run(cluster: ClusterProcess, args) -> dict:
    async with httpx.AsyncClient(base_url=cluster.url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        conversations = [Conversation(i, stateless=i % 2 == 0) for i in range(args.conversations)]
        steady: list[Turn] = []
        for _ in range(args.turns):
            steady += await round_(client, model, conversations, "steady", args.max_tokens)
        before = {c.index: c.replica for c in conversations}

        victim = f"replica{args.replicas}"
        cluster.hold_down(victim)
        removed = await round_(client, model, conversations, "remove", args.max_tokens)
        after_remove = {c.index: c.replica for c in conversations}

        cluster.bring_back(victim)
        await asyncio.sleep(6)  # HAProxy marks it up after two health checks
        added = await round_(client, model, conversations, "add", args.max_tokens)
        after_add = {c.index: c.replica for c in conversations}
        probes = await resume_probes(cluster, model, conversations[: args.probes], args.max_tokens)

    later = steady[len(conversations):]  # every turn after a conversation's first
    moved = [t for t in removed if before[t.conversation] != after_remove[t.conversation]]
    stayed = [t for t in removed if before[t.conversation] == after_remove[t.conversation]]
    return {
        "replicas": args.replicas, "conversations": args.conversations, "turns": args.turns,
        "tiny": args.tiny, "max_tokens": args.max_tokens, "model": model,
        "source_header": any(t.source in ("local", "shared", "prefill") for t in steady + removed),
        "steady_local_share": share(later, ("local", "same-replica")),
        "steady_cached_share": (sum(t.cached_tokens for t in later) / max(1, sum(t.prompt_tokens for t in later))),
        "removed_replica": victim,
        "on_removed_replica_before": sum(r == victim for r in before.values()) / len(before),
        "moved_on_remove": len(moved) / len(removed),
        "ttft_ms_moved": median_ms([t.ttft_s for t in moved]),
        "ttft_ms_stayed": median_ms([t.ttft_s for t in stayed]),
        "removed_sources": {source: sum(t.source == source for t in moved) for source in ("local", "shared", "prefill")},
        "moved_on_add_back": sum(after_remove[i] != after_add[i] for i in after_add) / len(after_add),
        "probe_sources": [t.source for t in probes],
        "ttft_ms_probe_local": median_ms([t.ttft_s for t in probes if t.phase == "probe-local"]),
        "ttft_ms_probe_resumed": median_ms([t.ttft_s for t in probes if t.phase == "probe-resumed"]),
        "turns_log": [asdict(t) for t in steady + removed + added + probes],
    }


def report(result: dict) -> str:
    extra = None
    if result["ttft_ms_moved"] is not None and result["ttft_ms_stayed"] is not None:
        extra = round(result["ttft_ms_moved"] - result["ttft_ms_stayed"], 1)
    basis = ("the replicas' x-sinkserve-session-source header" if result["source_header"]
             else "routing only: same replica as the previous turn (the server sends no session-source header)")
    rows = [
        ("replicas / conversations / steady turns", f"{result['replicas']} / {result['conversations']} / {result['turns']}"),
        ("turns served from a local session (steady)", f"{100 * result['steady_local_share']:.1f}% ({basis})"),
        ("prompt tokens from cache (steady, after turn 1)", f"{100 * result['steady_cached_share']:.1f}%"),
        (f"conversations on {result['removed_replica']} before removal",
         f"{100 * result['on_removed_replica_before']:.1f}%"),
        ("conversations moved when it was removed", f"{100 * result['moved_on_remove']:.1f}%"),
        ("where moved turns found their cache (session-source header)",
         ", ".join(f"{k} {v}" for k, v in result.get("removed_sources", {}).items())),
        ("TTFT of moved / stayed turns (median ms)", f"{result['ttft_ms_moved']} / {result['ttft_ms_stayed']}"),
        ("extra TTFT of moved turns under load (ms)", f"{extra}"),
        ("conversations moved when it came back", f"{100 * result['moved_on_add_back']:.1f}%"),
        ("idle cluster, one turn at a time: TTFT local / resumed from the shared store (median ms)",
         f"{result['ttft_ms_probe_local']} / {result['ttft_ms_probe_resumed']} "
         f"(sources: {', '.join(sorted(set(result['probe_sources'])))})"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=4, help="steady rounds before the fault")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=6, help="conversations resumed one at a time (phase 4)")
    parser.add_argument("--tiny", action="store_true", help="replicas serve the tiny random model (quick check)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("serve_args", nargs="*", help="extra `sinkserve serve` flags for every replica (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as state:
        cluster = ClusterProcess(Path(state), replicas=args.replicas, tiny=args.tiny,
                                 serve_args=tuple(args.serve_args), env=env).start()
        try:
            result = asyncio.run(run(cluster, args))
        finally:
            cluster.stop()
    (args.out / "cluster.json").write_text(json.dumps(result, indent=1))
    table = report(result)
    (args.out / "cluster.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
