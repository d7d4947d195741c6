"""What one benchmark.py run prints and writes beside its JSON: the terminal summary of each row, and
the run's Markdown (summary table, energy, per-subject MMLU, categories, HumanEval, engine agreement).

    python -c "import json, records, run_report; print(run_report.render_markdown(records.BenchmarkRun.from_dict(json.load(open('results/benchmark-20261123-081924.json')))))"

The comparison across runs is comparison.py's; this module renders a single run.
"""

from __future__ import annotations

import models
import mmlu
import results_io
from records import BenchmarkRun, ModelResult

NOT_ALLOWED = "not run: code execution not allowed (add --allow-code-execution)"



def print_summary(e: ModelResult) -> None:
    print(f"\n== {e.model} · {e.engine} · {e.weights_label} · {e.device_name} ==")
    print(f"params {e.params:,}  weights {results_io.gb(e.weight_bytes)} GB  KV cache "
          f"{e.kv_cache_bytes_per_1k_tokens / 1e6:.1f} MB per 1k tokens  "
          + (f"load {e.load_seconds:.2f} s" if e.load_seconds is not None else f"built in {e.build_seconds:.1f} s"))
    if e.speed:
        sp, roof = e.speed, e.speed.roofline
        print(f"prefill {sp.prefill.fmt()} tok/s (pp{sp.prefill.prompt_tokens})  decode {sp.decode.fmt()} tok/s "
              f"(tg{sp.decode.new_tokens})  TTFT {sp.ttft.fmt(0)} ms  peak {results_io.gb(e.memory.peak_bytes)} GB")
        if roof and roof.fraction is not None:
            print(f"roofline: {roof.achieved_gb_s:.2f} GB/s achieved of {roof.peak_gb_s:.1f} GB/s measured "
                  f"({100 * roof.fraction:.0f}%); memory allows at most {roof.bound_tok_s:.1f} tok/s")
        if sp.decode.energy:
            print(f"energy: prefill {fmt_energy(sp.prefill.energy)}  decode {fmt_energy(sp.decode.energy)}")
    for shots, res in (e.mmlu.items() if isinstance(e.mmlu, dict) else ()):
        print(f"MMLU {shots}-shot: micro {res.micro.fmt()}  macro {100 * res.macro['accuracy']:.1f}  "
              f"({res.micro.total} questions, {res.seconds:.0f} s, {res.truncated_prompts} truncated)")
    if isinstance(e.humaneval, str):
        if e.humaneval != NOT_ALLOWED:  # that one is said once per run, up front
            print(f"HumanEval: {e.humaneval}")
    elif e.humaneval:
        print(f"HumanEval ({e.humaneval.mode}): pass@1 {100 * e.humaneval.pass_at_1:.1f}% on "
              f"{e.humaneval.problems} problems  outcomes {e.humaneval.outcomes}")
    for phase, error in e.phase_errors.items():
        print(f"{phase}: failed — {error}")


def summary_rows(run: BenchmarkRun) -> tuple[list[str], list[list]]:
    """The run's summary table; columns of skipped phases are left out."""
    st = run.settings
    shots = [] if st["skip_mmlu"] else [str(k) for k in st["mmlu_shots"]]
    speed_cols = [] if st["skip_speed"] else ["Prefill tok/s", "Decode tok/s", "TTFT ms", "Peak GB", "Roofline"]
    headers = (["Model", "Engine · weights", "Params", "Load s", "Disk GB"] + speed_cols
               + [f"MMLU {k}-shot % [95% CI]" for k in shots] + ([] if st["skip_humaneval"] else ["HumanEval pass@1"]))
    rows = []
    for key, e in run.models.items():
        if not e.ok:
            rows.append([e.model, e.engine, "error: " + e.error[:80]] + [""] * (len(headers) - 3))
            continue
        load = "n/a (twin)" if e.load_seconds is None else f"{e.load_seconds:.2f}"
        row = [e.model, f"{e.engine} · {e.weights_label}", f"{e.params / 1e9:.3f}B", load, results_io.gb(e.disk_bytes)]
        if speed_cols:
            sp = e.speed
            roof = sp.roofline if sp else None
            row += [sp.prefill.fmt() if sp else "failed", sp.decode.fmt() if sp else "failed",
                    sp.ttft.fmt(0) if sp else "", results_io.gb(e.memory.peak_bytes) if e.memory else "",
                    f"{roof.achieved_gb_s:.2f} GB/s = {100 * roof.fraction:.0f}%" if roof and roof.fraction else ""]
        row += [(e.mmlu[k].micro.fmt() if isinstance(e.mmlu, dict) and k in e.mmlu else
                 e.mmlu if isinstance(e.mmlu, str) else "failed" if "mmlu" in e.phase_errors else "") for k in shots]
        if not st["skip_humaneval"]:
            he = e.humaneval
            row.append(he if isinstance(he, str) else f"{100 * he.pass_at_1:.1f}% ({he.problems}, {he.mode})" if he
                       else "failed" if "humaneval" in e.phase_errors else "")
        rows.append(row)
    return headers, rows


def render_markdown(run: BenchmarkRun) -> str:
    s = run.settings
    ok = [e for e in run.models.values() if e.ok]
    parts = ["# benchmark.py results\n", f"Settings: {settings_line(s)}\n", "## Summary\n",
             results_io.markdown_table(*summary_rows(run))]
    bandwidth = run.environment.get("memory_bandwidth")
    if bandwidth:
        parts.append(f"Roofline: achieved bandwidth = weight bytes × decode tok/s, against the machine's read "
                     f"bandwidth {bandwidth['best_gb_s']} GB/s ({bandwidth['method']}).\n")
    for title, get, unit in (("Decode tok/s", lambda e: e.speed.decode.mean, "tok/s"),
                             ("Prefill tok/s", lambda e: e.speed.prefill.mean, "tok/s"),
                             ("Peak memory during generation (GB)", lambda e: e.memory.peak_bytes / 1e9, "GB")):
        items = [(f"{e.model} · {e.engine}", get(e)) for e in ok if e.speed and e.memory]
        if items:
            digits = 1 if max(v for _, v in items) >= 10 else 2
            parts += [f"## {title}\n", "```\n" + results_io.bar_chart(items, unit=unit, digits=digits) + "```\n"]
    parts += energy_sections(run, ok) + mmlu_sections(ok) + category_sections(ok) + humaneval_sections(ok)
    parts += agreement_sections(ok) + error_sections(run)
    parts += ["## Environment\n", results_io.environment_markdown(run.environment)]
    return "\n".join(parts)


def fmt_energy(block: dict | None, unit: str = "tok") -> str:
    """'0.412 J/tok · 2.43 tok/J (0.118 J/tok above idle)', or '' without a reading."""
    if not block:
        return ""
    f = block["per_unit"]
    text = f"{f['j_per_unit']:.3g} J/{unit}" + (f" · {f['units_per_j']:.3g} {unit}/J" if f["units_per_j"] else "")
    return text + (f" ({f['above_idle_j_per_unit']:.3g} J/{unit} above idle)" if f["above_idle_j_per_unit"] is not None
                   else "")


def energy_sections(run: BenchmarkRun, ok: list[ModelResult]) -> list[str]:
    """J/token for prefill and decode, J per MMLU question and HumanEval problem; or, once per run,
    why energy was not measured."""
    meter = run.environment.get("energy") or {}
    if not meter.get("available"):
        return [f"Energy: {meter.get('reason') or 'not measured — this run predates the energy meter'}.\n"]
    idle = meter.get("idle_watts") or {}
    rows = [[f"{e.model} · {e.engine}", fmt_energy(e.speed.prefill.energy) if e.speed else "",
             fmt_energy(e.speed.decode.energy) if e.speed else "",
             f"{e.speed.decode.energy['avg_watts']:.1f}" if e.speed and e.speed.decode.energy else "",
             "; ".join(f"{k}-shot {fmt_energy(r.energy, 'question')}" for k, r in e.mmlu.items())
             if isinstance(e.mmlu, dict) else "",
             fmt_energy(e.humaneval.energy, "problem") if e.humaneval and not isinstance(e.humaneval, str) else ""]
            for e in ok]
    return ["## Energy\n", f"Counter: {meter['counter']}; idle {sum(idle.values()):.1f} W "
            f"({', '.join(f'{d} {w:.1f} W' for d, w in idle.items())}) over {meter['idle_seconds']:.1f} s before the "
            "first model. Above idle = total − idle W × seconds (docs/energy.md).\n",
            results_io.markdown_table(["Model · engine", "Prefill", "Decode", "Decode avg W", "MMLU", "HumanEval"],
                                      rows)]


def agreement_sections(ok: list[ModelResult]) -> list[str]:
    """Rows of the same model (engines, weights formats) that scored the same MMLU questions: how
    often they agree, question by question, and how far their log-likelihoods are apart."""
    parts = []
    by_model: dict[str, list[ModelResult]] = {}
    for e in ok:  # one registry model in several files (fp32, F16, Q8_0 …) is one group too
        spec = models.spec_of(e.name)
        by_model.setdefault(spec.key if spec else models.canonical_name(e.name), []).append(e)
    for group in (g for g in by_model.values() if len(g) > 1):
        ref = group[0]
        for shots in (ref.mmlu if isinstance(ref.mmlu, dict) else {}):
            rows = []
            for other in group[1:]:
                res = other.mmlu.get(shots) if isinstance(other.mmlu, dict) else None
                if res is None:
                    continue
                a = {(q.subject, q.index): q for q in ref.mmlu[shots].questions}
                pairs = [(a[(q.subject, q.index)], q) for q in res.questions if (q.subject, q.index) in a]
                same = sum(x.prediction == y.prediction for x, y in pairs)
                diffs = [abs(u - v) for x, y in pairs for u, v in zip(x.loglikelihoods, y.loglikelihoods)]
                paired = results_io.paired_comparison([x.correct for x, _ in pairs], [y.correct for _, y in pairs])
                rows.append([f"{other.engine} · {other.weights_label}", f"{same}/{len(pairs)}",
                             f"{sum(diffs) / len(diffs):.4f}", f"{max(diffs):.4f}",
                             f"{100 * paired['accuracy_diff']:+.1f} [{100 * paired['diff_ci95'][0]:+.1f}, "
                             f"{100 * paired['diff_ci95'][1]:+.1f}]", f"{paired['mcnemar_p']:.3f}"])
            if rows:
                parts += [f"## {ref.model}: MMLU {shots}-shot, each row against {ref.engine} · {ref.weights_label}\n",
                          results_io.markdown_table(["Engine · weights", "Same prediction", "Mean |Δ log-lik|",
                                                     "Max |Δ log-lik|", "Δ accuracy, points [95% CI]", "McNemar p"],
                                                    rows)]
    return parts


def settings_line(s: dict) -> str:
    parts = []
    if not s["skip_speed"]:
        parts.append(f"prompt {s['prompt_tokens']} tokens (prefill), {s['new_tokens']} new tokens (decode, forced "
                     f"length), {s['repetitions']} repetitions after 1 warm-up, mean ± std")
    if not s["skip_mmlu"] and not s["synthetic"]:
        parts.append(f"MMLU {', '.join(map(str, s['mmlu_shots']))}-shot, {len(s['mmlu_subjects'])} subjects, limit "
                     f"{s['mmlu_limit'] or 'all'} per subject{', chat template' if s.get('chat_template') else ''}")
    if not s["skip_humaneval"] and not s["synthetic"]:
        parts.append(f"HumanEval {s['humaneval_limit'] or 'all 164'} problems, {s['humaneval_mode']} mode, "
                     f"{s['humaneval_samples']} sample(s) per problem" if s.get("allow_code_execution") else NOT_ALLOWED)
    return "; ".join(parts) + "." + (" Synthetic (random-weight) twins: speed and memory only." if s["synthetic"] else "")


def mmlu_sections(ok: list[ModelResult]) -> list[str]:
    """Per shot count: micro averages against the chance line, and a per-subject table."""
    parts = []
    scored = [e for e in ok if isinstance(e.mmlu, dict)]
    for shots in sorted({k for e in scored for k in e.mmlu}, key=int):
        runs = [(f"{e.model} · {e.engine}", e.mmlu[shots]) for e in scored if shots in e.mmlu]
        items = [(name, 100 * r.micro.accuracy) for name, r in runs] + [("chance", 100 * mmlu.CHANCE)]
        parts += [f"## MMLU {shots}-shot (micro average %, chance = 25%)\n",
                  "```\n" + results_io.bar_chart(items, unit="%") + "```\n"]
        subjects = sorted({s for _, r in runs for s in r.subjects})
        rows = [[subj] + [f"{r.subjects[subj].fmt()} (n={r.subjects[subj].total})" if subj in r.subjects else ""
                          for _, r in runs] for subj in subjects]
        rows.append(["**micro average**"] + [r.micro.fmt() for _, r in runs])
        rows.append(["truncated prompts"] + [str(r.truncated_prompts) for _, r in runs])
        parts += [f"### MMLU {shots}-shot per subject (% [95% CI])\n",
                  results_io.markdown_table(["Subject"] + [name for name, _ in runs], rows)]
    return parts


def category_sections(ok: list[ModelResult]) -> list[str]:
    measured = [e for e in ok if e.speed and isinstance(e.speed.categories, dict)]
    if not measured:
        return []
    rows = [[cat] + [e.speed.categories[cat].fmt() for e in measured] for cat in measured[0].speed.categories]
    return ["## End-to-end tok/s per prompt category (model's own stopping)\n",
            results_io.markdown_table(["Category"] + [f"{e.model} · {e.engine}" for e in measured], rows)]


def humaneval_sections(ok: list[ModelResult]) -> list[str]:
    parts = []
    for e in ok:
        he = e.humaneval
        if he is None or isinstance(he, str):
            continue
        rows = [[p.task_id, f"{p.passed}/{len(p.samples)}", p.samples[0].status, p.samples[0].error[:80]]
                for p in he.per_problem]
        isolation = (he.isolation or {}).get("tool", "not recorded")
        parts += [f"## HumanEval: {e.model} · {e.engine} (pass@1 = {100 * he.pass_at_1:.1f}%, {he.mode} mode, "
                  f"sandbox: {isolation})\n", results_io.markdown_table(["Task", "Passed", "First sample", "Error"], rows)]
    return parts


def error_sections(run: BenchmarkRun) -> list[str]:
    rows = [[e.model, e.engine, "load", e.error] for e in run.models.values() if not e.ok]
    rows += [[e.model, e.engine, phase, error] for e in run.models.values() for phase, error in e.phase_errors.items()]
    return ["## Errors\n", results_io.markdown_table(["Model", "Engine", "Phase", "Error"], rows)] if rows else []
