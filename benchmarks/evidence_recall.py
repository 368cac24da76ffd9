"""Evidence recall of the question's block scores, without generating: does the evidence make the answer's cut?

    python -m benchmarks.evidence_recall --model qwen.gguf --device cuda --tasks niah,squad,babilong-qa1 \
        --lengths 32K,128K --samples 6 --budgets 4096,16384

Each context is read once (`engine.read`); each question's tokens (and its chat header's) attend every block of
every layer (`lookup.block_attention`), and several ways of turning that attention into one score per block are
compared: the share of evidence spans inside the blocks chosen at each budget of tokens (`choose_evidence`, with
the config's neighbours), and the median rank of each span's best block. The engine's own scoring is
`max_minus_header` (BENCHMARKS.md §7 has the measurement that chose it).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch
from torch import Tensor

from benchmarks import data
from benchmarks.cli import _key_values, _load, _tasks, build_parser
from benchmarks.tasks import generate
from qllm_runtime import QLLMConfig, hook
from qllm_runtime.lookup import attention_added, block_attention, choose_evidence
from qllm_runtime.question import QuestionProbe


def scorings(att: Tensor, n_header: int) -> dict[str, Tensor]:
    """Ways to score blocks from att: (layers, heads, n_header + m, n_blocks), the block attention of the chat
    header's tokens, then the question's. `max_minus_header` is the engine's (`lookup.question_attention`)."""
    question, header = att[:, :, n_header:], att[:, :, :n_header]
    mean = question.mean(dim=2)  # (layers, heads, n_blocks)
    peak = mean.amax(dim=-1)  # how concentrated each head's attention is
    top_heads = peak.flatten() >= peak.flatten().quantile(0.9)
    ranks = mean.sum(dim=1).argsort(dim=-1, descending=True).argsort(dim=-1).float()  # (layers, n_blocks)
    return {
        "mean": mean.sum(dim=(0, 1)),
        "max_token": question.amax(dim=2).sum(dim=(0, 1)),
        "max_minus_header": attention_added(att, n_header).sum(dim=0),
        "mean_minus_header": (mean - header.mean(dim=2)).sum(dim=(0, 1)),
        "last_8_tokens": question[:, :, -8:].mean(dim=2).sum(dim=(0, 1)),
        "top_10pct_heads": mean.flatten(0, 1)[top_heads].sum(dim=0),
        "rank_fusion": (1.0 / (60.0 + ranks)).sum(dim=0),
        "log_mean": mean.clamp_min(1e-12).log().sum(dim=(0, 1)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()  # quickllama-bench's flags (--model, --device, --tasks, --lengths, --samples, --set ...)
    parser.description = __doc__
    parser.add_argument("--budgets", default="4096,16384", help="evidence budgets in tokens")
    parser.add_argument("--neighbors", help="evidence_neighbors values to compare, e.g. 0,1,1g (default: the config's;"
                        " Ng: a neighbour joins only where its own score is above the median block's)")
    args = parser.parse_args(argv)
    base = QLLMConfig.model_validate({**QLLMConfig().model_dump(), "full_within_window": False,
                                      **{k: v[0] for k, v in _key_values(args.set, "--set").items()}})
    engine = _load(args, base)
    counter, budgets = data.TokenCounter(engine.tokenizer), [int(b) for b in args.budgets.split(",")]
    neighbors = args.neighbors.split(",") if args.neighbors else [str(base.evidence_neighbors)]
    recall: dict[tuple, list[float]] = defaultdict(list)
    cover: dict[tuple, list[float]] = defaultdict(list)  # share of each span's blocks inside the evidence
    best_rank: dict[tuple, list[int]] = defaultdict(list)
    t0 = time.perf_counter()
    for length in args.lengths:
        for task in _tasks(args.tasks, None):
            for sample in generate(task, counter, length, 0, args.samples or 2, args.depths or [0.5],
                                   same_questions=args.same_questions):
                memory = engine.read(sample.context)
                for query in sample.queries:
                    att, n_header = _attention(engine, memory, query.question)
                    evidence = _evidence_blocks(memory, query.evidence, base, att.shape[-1])
                    if not evidence:
                        continue
                    for scoring, score in scorings(att, n_header).items():
                        rank = score.argsort(descending=True).argsort().cpu()
                        for near in neighbors:
                            name = scoring if len(neighbors) == 1 else f"{scoring}, neighbours {near}"
                            best_rank[(task.name, length, name)] += [int(min(rank[b] for b in s)) for s in evidence]
                            for budget in budgets:
                                chosen = _chosen(score, budget // base.block_size, near)
                                hit = sum(bool(s & chosen) for s in evidence) / len(evidence)
                                recall[(task.name, length, name, budget)].append(hit)
                                whole = sum(len(s & chosen) / len(s) for s in evidence) / len(evidence)
                                cover[(task.name, length, name, budget)].append(whole)
            print(f"[{time.perf_counter() - t0:6.0f}s] {task.name} @ {length} done", flush=True)
            _table(recall, cover, best_rank, budgets)


def _chosen(score: Tensor, count: int, near: str) -> set[int]:
    """The evidence blocks at `count` blocks: the engine's `choose_evidence` with `near` neighbours, or ("Ng") the
    best blocks each with those of its N neighbours whose own score is above the median block's."""
    if not near.endswith("g"):
        return set(choose_evidence(score, count, int(near)).tolist())
    reach, keep, chosen = int(near[:-1]), score > score.median(), []
    for b in score.argsort(descending=True).tolist():
        around = [b + d for d in range(-reach, reach + 1) if d and 0 <= b + d < len(score) and keep[b + d]]
        chosen += [x for x in [b, *around] if x not in chosen][: count - len(chosen)]
        if len(chosen) >= count:
            break
    return set(chosen)


@torch.inference_mode()
def _attention(engine, memory, question: str) -> tuple[Tensor, int]:
    """(layers, heads, n_header + m, n_blocks) block attention of the question probe's header and question tokens,
    and n_header."""
    ids, start, end = engine.prompts.question_probe(question, max_tokens=engine.config.n_local)
    probe = QuestionProbe(engine._rope, start, end, engine.config.n_local)
    hook.run_model(engine.model, torch.tensor([ids], device=engine.device), probe)
    q = probe.question
    return torch.stack([
        block_attention(torch.cat([q.header_queries[i], q.queries[i]], dim=1), layer.init_k[:, : layer.init_len],
                        layer.store.key_chunks(64))
        for i, layer in sorted(memory.session.memory.layers.items())
    ]), start


def _evidence_blocks(memory, spans, config: QLLMConfig, n_blocks: int) -> list[set[int]]:
    """Per evidence span (characters), the blocks holding any of its tokens."""
    out = []
    for a, b in spans:
        blocks = {(p - config.n_init) // config.block_size for p, o in enumerate(memory.tokens.offsets)
                  if o is not None and o[0] < b and o[1] > a and p >= config.n_init}
        if blocks := {x for x in blocks if x < n_blocks}:
            out.append(blocks)
    return out


def _table(recall: dict, cover: dict, best_rank: dict, budgets: list[int]) -> None:
    """recall@B: share of evidence spans with a block inside the evidence at B tokens; cover@B: share of each span's
    blocks inside it (a passage read whole)."""
    heads = [f"recall@{b}" for b in budgets] + [f"cover@{b}" for b in budgets]
    print("| task | length | scoring | " + " | ".join(heads) + " | median best rank |")
    print("|---|---:|---|" + "---:|" * (len(heads) + 1))
    for (task, length, name) in sorted(best_rank):
        cells = [f"{100 * statistics.mean(table[(task, length, name, b)]):.0f}"
                 for table in (recall, cover) for b in budgets]
        print(f"| {task} | {length} | {name} | " + " | ".join(cells)
              + f" | {statistics.median(best_rank[(task, length, name)]):.0f} |")


if __name__ == "__main__":
    main()
