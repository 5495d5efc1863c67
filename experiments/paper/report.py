"""The markdown report: tables, figures inline, and one honest paragraph per finding."""

from __future__ import annotations

import os

import numpy as np


def _f(x, spec=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else \
        format(x, spec)


def write(results: dict, workdir: str) -> str:
    r = results
    names = [n.split("/")[-1] for n in r["setup"]["tasks"]]
    lines = [f"# Reproduction: On Task Vectors and Gradients (arXiv 2508.16082)", "",
             f"Config `{r['config']['name']}` on `{r['config']['data']['suite']}`, "
             f"{r['setup']['machine']}, {r['elapsed_s']:.0f} s. "
             "Every number below is in `results.json`; the config is in `config.json`.", ""]

    s = r["setup"]
    lines += ["## Setup", "",
              f"Base model: {s['model']}, pretrained on `{s['source']}`; each task gets a "
              "frozen linear head fitted on the base model's features (the analogue of "
              "CLIP's zero-shot head); finetuning and merging act on the encoder only.", "",
              "| task | train | test | base acc | finetuned acc (full batch) | finetuned acc "
              "(minibatch) |", "|---|---|---|---|---|---|"]
    for i, n in enumerate(names):
        lines.append(f"| {n} | {s['train_sizes'][i]} | {s['test_sizes'][i]} | "
                     f"{_f(s['base_test'][i])} | {_f(s['finetuned_test']['full_batch'][i])} | "
                     f"{_f(s['finetuned_test']['minibatch'][i])} |")
    lines.append("")

    th = r["theorem"]
    lines += ["## Theorem 1 on this model", "",
              f"T = {th['num_tasks']} tasks, alpha = {th['alpha']}, float64, learning rates "
              f"{th['lrs']}. `max gap` is max over lr of "
              "||theta_TA^(k) - theta_MT^(k)||; the slopes are fitted on log-log axes against "
              "lr (theory: exactly 0 at k = 1; slope 2 for the gap and 3 after subtracting "
              "lr^2 C_k).", "",
              "| k | max gap | slope of gap | slope of gap - lr^2 C_k |", "|---|---|---|---|"]
    for row in th["rows"]:
        lines.append(f"| {row['k']} | {row['max_gap']:.2e} | {_f(row.get('slope_gap'), '.3f')}"
                     f" | {_f(row.get('slope_residual'), '.3f')} |")
    lines += ["", "![theorem 1](figures/theorem1.png)", ""]

    lines += dominance_section(r["dominance"], r["config"]["dominance"])
    if "regime" in r:
        lines += regime_section(r["regime"])

    lines += merging_section(r)
    m = r["merging"]
    mt = r["multitask"]
    lines += ["References (average test accuracy): base " +
              f"{_f(np.mean(m['base_test']))}, multitask GD full batch "
              f"{_f(mt['full_batch']['avg_accuracy'])}, multitask SGD "
              f"{_f(mt['minibatch']['avg_accuracy'])}.", ""]

    a = r["atm"]
    lines += ["## Iterative task arithmetic (ATM)", "",
              f"ATM: r rounds of one minibatch epoch per task, averaged (alpha = "
              f"{a['atm_alpha']:.3g}); task arithmetic: r-epoch task vectors, alpha on "
              "validation. Same finetuning budget at each r.", "",
              "| r | ATM | task arithmetic |", "|---|---|---|"]
    for i, rr in enumerate(a["rounds"]):
        lines.append(f"| {rr} | {_f(a['atm_avg_accuracy'][i])} | "
                     f"{_f(a['task_arithmetic_avg_accuracy'][i])} |")
    lines += ["", "![atm](figures/atm.png)", "",
              "## Trajectories in parameter space", "",
              "PCA (through the Gram matrix of all points) of every task's minibatch "
              "finetuning trajectory, task arithmetic merges after k epochs, ATM rounds and "
              "multitask GD. Explained variance of the two components: "
              + ", ".join(f"{100 * v:.1f}%" for v in
                          r["trajectories"]["explained_variance_ratio"]) + ".", "",
              "![trajectories](figures/trajectories_pca.png)", ""]

    lines += ["## Findings against the paper's claims", ""] + [
        f"- **{f['claim']}** {f['verdict']}" for f in r["findings"]] + [""]
    text = "\n".join(lines)
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as fh:
        fh.write(text)
    return path


def _merge_cell(row: dict) -> str:
    alpha = "" if row.get("alpha") is None else f" (a={row['alpha']:g})"
    return f"**{_f(row['avg_normalized'])}** / {_f(row['avg_accuracy'])}{alpha}"


def merging_headline(r: dict, mode: str = "minibatch") -> dict:
    """Base, finetuned and task arithmetic at convergence (``mode``), averaged over tasks:
    absolute and normalized accuracy, and the share of the finetuning gain task
    arithmetic keeps, ``(TA - base) / (finetuned - base)``."""
    mm = r["merging"][mode]
    last = mm["per_epoch"][str(mm["epochs"][-1])]
    base, ft = np.asarray(r["merging"]["base_test"]), np.asarray(mm["finetuned_test"])
    ta = last["task_arithmetic"]
    gain = float(ft.mean() - base.mean())
    best = max(last, key=lambda n: last[n]["avg_normalized"])
    return {"mode": mode, "base": float(base.mean()),
            "base_normalized": float(np.mean(base / ft)), "finetuned": float(ft.mean()),
            "task_arithmetic": ta["avg_accuracy"],
            "task_arithmetic_normalized": ta["avg_normalized"], "alpha": ta["alpha"],
            "recovered": (ta["avg_accuracy"] - float(base.mean())) / gain if gain > 0
            else float("nan"),
            "best": best, "best_normalized": last[best]["avg_normalized"],
            "best_accuracy": last[best]["avg_accuracy"]}


def merging_section(r: dict) -> list[str]:
    """One table per trajectory kind: a row per method, a column per epoch."""
    m, cfg = r["merging"], r["config"]["merging"]
    lines = ["## Merging after k epochs vs at convergence", "",
             "Every merge of `experiments/paper/merging_study.py`'s `METHODS` on the same "
             "task vectors. Each cell: **normalized accuracy** (merged test accuracy / the "
             "individually finetuned, converged model's, per task, averaged; the headline) "
             "/ absolute test accuracy averaged over tasks, and the alpha chosen on the "
             f"validation splits from the grid {cfg['alphas']} (the same grid for every "
             "method with a coefficient). Data-aware merges use their papers' procedures: "
             "Fisher and RegMean statistics on each task's training split, AdaMerging's "
             "coefficients learned by entropy minimization on the unlabeled test inputs "
             "(its test-time setting). Model Stock is made for several finetunes of one "
             "task; with one finetune per task it is applied across the tasks' vectors, "
             "so its ratio comes from the angles between different tasks (near-orthogonal "
             "task vectors give a ratio near 0, i.e. close to the base).", ""]
    for mode in cfg["trajectories"]:
        mm = m[mode]
        epochs = [str(e) for e in mm["epochs"]]
        methods = list(mm["per_epoch"][epochs[0]])
        ft = np.asarray(mm["finetuned_test"])
        base = np.asarray(m["base_test"])
        lines += [f"**{mode}** (convergence = epoch {mm['converged_epoch']}; finetuned "
                  f"{_f(float(ft.mean()))}, base **{_f(float(np.mean(base / ft)))}** / "
                  f"{_f(float(base.mean()))})", "",
                  "| method | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                  "|---|" + "---|" * len(epochs)]
        for n in methods:
            lines.append(f"| {n} | " + " | ".join(_merge_cell(mm["per_epoch"][e][n])
                                                   for e in epochs) + " |")
        first, last = mm["per_epoch"][epochs[0]], mm["per_epoch"][epochs[-1]]
        key = "task_arithmetic" if "task_arithmetic" in first else methods[0]
        names = [n.split("/")[-1] for n in r["setup"]["tasks"]]
        lines += ["", f"Per task, {key} after 1 epoch vs at convergence ({mode}):",
                  "", "| task | base | 1 epoch | converged | finetuned |",
                  "|---|---|---|---|---|"]
        for i, n in enumerate(names):
            lines.append(f"| {n} | {_f(base[i])} | {_f(first[key]['test_accuracy'][i])} | "
                         f"{_f(last[key]['test_accuracy'][i])} | {_f(ft[i])} |")
        lines += ["", f"![merging {mode}](figures/merging_{mode}.png)", ""]
    settings = m.get("methods", {})
    if settings:
        lines += ["Settings of every method:", "", "| method | kind | settings | source |",
                  "|---|---|---|---|"]
        for n, d in settings.items():
            lines.append(f"| {n} | {d['kind']} | {d['settings']} | {d['reference']} |")
        lines.append("")
    return lines


def _dominance_table(res: dict, prefixes) -> list[str]:
    cuts = [str(e) for e in prefixes if str(e) in res["per_task"][0]["share_at"]]
    head = ("| task | epochs | plateau epoch | share (run) | " +
            " | ".join(f"share E={e}" for e in cuts) +
            " | share at plateau | cos(g_1, g_e), e = 2.. | mean cos(g_1, g_e) | mean cos "
            "(all pairs, first 5) | ‖tau‖/‖theta_0‖ |")
    lines = [head, "|---" * (9 + len(cuts)) + "|"]
    rows = [(r["task"].split("/")[-1], r["num_epochs"], r["plateau_epoch"],
             r["first_epoch_share"], [r["share_at"][e] for e in cuts], r["share_at_plateau"],
             r["cos_to_first"], r["mean_cos_to_first5"], r["mean_cos_first5"],
             r["relative_movement"]) for r in res["per_task"]]
    rows.append(("**mean**", rows[0][1], _f(res["mean_plateau_epoch"], ".1f"),
                 res["mean_first_epoch_share"], [res["mean_share_at"][e] for e in cuts],
                 res["mean_share_at_plateau"], res["mean_cos_to_first"],
                 res["mean_cos_to_first5"], res["mean_cos_first5"],
                 res["mean_relative_movement"]))
    for (n, e, p, sh, at, sp, c1, mc1, mc, mv) in rows:
        lines.append(f"| {n} | {e} | {p} | {_f(sh)} | " + " | ".join(_f(x) for x in at) +
                     f" | {_f(sp)} | {', '.join(_f(c, '.2f') for c in c1)} | {_f(mc1)} | "
                     f"{_f(mc)} | {_f(mv)} |")
    return lines


def dominance_section(d: dict, cfg: dict) -> list[str]:
    """Minibatch runs first (the paper's setting), full batch apart with its 1/E caveat."""
    lines = ["## First-epoch dominance", "",
             "Normalized contribution of epoch e: d_e / sum_j d_j with d_e = ||theta^(e) - "
             "theta^(e-1)||. *share E=k*: the first epoch's share of the run cut at k epochs, "
             "d_1 / sum_{j<=k} d_j. *Plateau epoch*: the first epoch whose validation "
             f"accuracy is within {cfg['plateau_tolerance']} of the run's best; the share "
             "at the plateau is the share of the run cut there. Direction: cos(g_1, g_e) "
             "against the first epoch's gradient (the paper's curve; g_e = the sum of epoch "
             "e's step gradients), beside the mean over all pairs of the first five epochs "
             "(which also counts later, better aligned pairs). ‖tau‖/‖theta_0‖: how far the "
             "run moved. The paper reports a first-epoch share of 0.3-0.7 and cosines above "
             "0.8.", ""]
    for mode in [m for m in ("minibatch", "full_batch") if m in d]:
        res = d[mode]
        if mode == "full_batch":
            lines += [f"**full batch** (one GD step per epoch): each epoch is a single step "
                      f"of a smoothly decaying gradient, so the first-epoch share is about "
                      f"1/E by construction (1/E = {1 / res['per_task'][0]['num_epochs']:.3f}"
                      " here) and is not comparable with the paper's 0.3-0.7.", ""]
        else:
            lines += [f"**minibatch** ({res['steps_per_epoch']:.0f} steps per epoch)", ""]
        lines += _dominance_table(res, cfg["prefixes"]) + [""]
    for mode in d:
        lines += [f"![contributions {mode}](figures/contributions_{mode}.png)",
                  f"![cosines {mode}](figures/cosines_{mode}.png)"]
    lines.append("")
    return lines


def regime_paragraph(g: dict) -> str:
    """Where each half of the claim holds on the map, from its numbers."""
    s = g["summary"]
    n = s["num_settings"]
    fmt = lambda r: "n/a" if r is None else f"{r[0]:.2f}-{r[1]:.2f}"  # noqa: E731
    sets = lambda key: ", ".join(  # noqa: E731
        f"lr {x['learning_rate']:g} at {x['steps_per_epoch']:.0f} steps/epoch"
        for x in g["settings"] if x[key]) or "none"
    return (f"Over {n} settings ({g['epochs']} epochs, tasks "
            f"{', '.join(t.split('/')[-1] for t in g['tasks'])}): the **norm** half (share "
            f"in 0.3-0.7) holds in {s['num_share_in_band']} ({sets('share_in_band')}), with "
            f"mean cos(g_1, g_e) {fmt(s['cosine_range_when_share_in_band'])} there; the "
            f"**direction** half (cosine > 0.8) holds in {s['num_cosine_above']} "
            f"({sets('cosine_above')}), where the relative movement is "
            f"{fmt(s['movement_range_when_cosine_above'])} and the share "
            f"{fmt(s['share_range_when_cosine_above'])}; both at once in {s['num_both']}. "
            f"Cut at each run's plateau epoch, the share is in the band in "
            f"{s.get('num_share_at_plateau_in_band', 'n/a')} settings (mean cos(g_1, g_e) "
            f"{fmt(s.get('cosine_range_when_plateau_share_in_band'))} there; both halves "
            f"in {s.get('num_both_at_plateau', 'n/a')}). "
            "High cosines belong to the lazy regime (small learning rates, parameters move "
            "little); a large first-epoch share needs the first epoch to move much more than "
            "the later ones, which comes with larger learning rates and fewer aligned "
            "gradients.")


def regime_section(g: dict) -> list[str]:
    lines = ["## Regime map: learning rate and steps per epoch", "",
             f"Minibatch finetunes ({g['epochs']} epochs) at learning rates "
             f"{g['learning_rates']} (one vmapped program per batch size) and batch sizes "
             f"{g['batch_sizes']}; means over tasks "
             f"{', '.join(t.split('/')[-1] for t in g['tasks'])}. Shaded: the paper's band "
             "(share 0.3-0.7, cosine > 0.8).", "",
             "| lr | steps/epoch | first-epoch share | plateau epoch | share at plateau | "
             "cos(g_1, g_e), e = 2.. | mean cos | ‖tau‖/‖theta_0‖ | val acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in g["settings"]:
        lines.append(f"| {x['learning_rate']:g} | {x['steps_per_epoch']:.0f} | "
                     f"{_f(x['first_epoch_share'])} | {_f(x['plateau_epoch'], '.1f')} | "
                     f"{_f(x['share_at_plateau'])} | "
                     f"{', '.join(_f(c, '.2f') for c in x['cos_to_first'])} | "
                     f"{_f(x['mean_cos_to_first'])} | {_f(x['relative_movement'])} | "
                     f"{_f(x['final_validation_accuracy'])} |")
    lines += ["", "![regime map](figures/regime_map.png)", "", regime_paragraph(g), ""]
    return lines


def findings(r: dict) -> list[dict]:
    """One honest sentence per claim, computed from the numbers."""
    out = []
    th = r["theorem"]["rows"]
    k1 = th[0]["max_gap"]
    slopes = [row["slope_gap"] for row in th[1:]]
    res = [row["slope_residual"] for row in th[1:]]
    ok = k1 < 1e-10 and all(abs(s - 2) < 0.15 for s in slopes)
    out.append({"claim": "Theorem 1 (one epoch of task arithmetic = one multitask GD step; "
                         "eta^2 gap after k epochs).",
                "verdict": ("Agrees." if ok else "Partly agrees.") +
                f" At k = 1 the gap is {k1:.1e} (float64 rounding); for k >= 2 the gap's "
                f"slope against lr is {', '.join(f'{s:.2f}' for s in slopes)} and the "
                f"residual's {', '.join(f'{s:.2f}' for s in res)} (theory: 2 and 3).",
                "ok": ok})
    out += dominance_findings(r["dominance"])
    if "regime" in r:
        s = r["regime"]["summary"]
        out.append({"claim": "Regime map (beyond the paper): where each half of first-epoch "
                             "dominance holds.",
                    "verdict": regime_paragraph(r["regime"]),
                    "ok": s["num_both"] > 0})
    for mode in r["config"]["merging"]["trajectories"]:
        mm = r["merging"][mode]
        first, last = mm["per_epoch"][str(mm["epochs"][0])], mm["per_epoch"][
            str(mm["epochs"][-1])]
        parts = []
        gaps = []
        for n in first:
            g = first[n]["avg_normalized"] - last[n]["avg_normalized"]
            gaps.append(g)
            parts.append(f"{n} {first[n]['avg_accuracy']:.3f} vs {last[n]['avg_accuracy']:.3f}")
        close = all(g > -0.05 for g in gaps)
        out.append({"claim": f"Merging 1-epoch task vectors is about as good as merging "
                             f"converged ones ({mode}).",
                    "verdict": (("Agrees" if close else "Does not hold here") +
                                f": average test accuracy after 1 epoch vs at convergence "
                                f"(epoch {mm['converged_epoch']}): " + "; ".join(parts) +
                                f". Normalized-accuracy differences (1 epoch - converged): "
                                + ", ".join(f"{g:+.3f}" for g in gaps) + "."),
                    "ok": close})
    if "minibatch" in r["merging"]:
        h = merging_headline(r)
        worth = h["recovered"] >= 0.4 and h["finetuned"] - h["base"] >= 0.05
        out.append({"claim": "Merging is worth measuring on this suite (minibatch, at "
                             "convergence).",
                    "verdict": (("Yes" if worth else "Not clearly") +
                                f": base {h['base']:.3f}, finetuned {h['finetuned']:.3f}, "
                                f"task arithmetic {h['task_arithmetic']:.3f} (alpha "
                                f"{h['alpha']:g}): normalized accuracy "
                                f"{h['task_arithmetic_normalized']:.3f} (base "
                                f"{h['base_normalized']:.3f}), {100 * h['recovered']:.0f}% "
                                "of the finetuning gain kept. Best merge: "
                                f"{h['best']} {h['best_normalized']:.3f} normalized "
                                f"({h['best_accuracy']:.3f})."),
                    "ok": worth})
    a = r["atm"]
    gain = a["gain_at_final_round"]
    out.append({"claim": "Iterative task arithmetic (ATM) beats task arithmetic at the same "
                         "finetuning budget.",
                "verdict": (("Agrees" if gain > 0 else "Does not hold here") +
                            f": after {a['rounds'][-1]} rounds ATM reaches "
                            f"{a['atm_avg_accuracy'][-1]:.3f} vs "
                            f"{a['task_arithmetic_avg_accuracy'][-1]:.3f} for task arithmetic "
                            f"on {a['rounds'][-1]}-epoch task vectors ({gain:+.3f})."),
                "ok": gain > 0})
    return out


def dominance_findings(dominance: dict) -> list[dict]:
    """One verdict per half of the claim (norm, direction), minibatch; full batch apart."""
    out = []
    if "minibatch" in dominance:
        d = dominance["minibatch"]
        share, plateau = d["mean_share_at_plateau"], d["mean_plateau_epoch"]
        run_share, e = d["mean_first_epoch_share"], d["per_task"][0]["num_epochs"]
        band = lambda x: 0.3 <= x <= 0.7  # noqa: E731
        out.append({"claim": "First-epoch dominance in norm (minibatch): the first epoch is "
                             "0.3-0.7 of the path.",
                    "verdict": (("Agrees" if band(share) else "Does not hold here") +
                                f": the mean first-epoch share is {share:.2f} over the run cut "
                                f"at its plateau (mean plateau epoch {plateau:.1f}) and "
                                f"{run_share:.2f} over all {e} epochs "
                                f"({'inside' if band(run_share) else 'outside'} the band); "
                                "the share falls with the run's length: " +
                                ", ".join(f"{v:.2f} at E={k}" for k, v in
                                          d["mean_share_at"].items()) + "."),
                    "ok": band(share)})
        cos = d["mean_cos_to_first5"]
        out.append({"claim": "First-epoch dominance in direction (minibatch): cos(g_1, g_e) "
                             "above 0.8 over the first five epochs.",
                    "verdict": (("Agrees" if min(d["mean_cos_to_first"]) > 0.8 else
                                 "Does not hold here (at or below 0.8 for e = " +
                                 ", ".join(str(i + 2) for i, c in
                                           enumerate(d["mean_cos_to_first"]) if c <= 0.8)
                                 + ")") +
                                ": mean cos(g_1, g_e) for e = 2.. is " +
                                ", ".join(f"{c:.2f}" for c in d["mean_cos_to_first"]) +
                                f" (mean {cos:.2f}; the all-pairs mean is "
                                f"{d['mean_cos_first5']:.2f}), with relative movement "
                                f"‖tau‖/‖theta_0‖ = {d['mean_relative_movement']:.3f}."),
                    "ok": min(d["mean_cos_to_first"]) > 0.8})
    if "full_batch" in dominance:
        d = dominance["full_batch"]
        e = d["per_task"][0]["num_epochs"]
        out.append({"claim": "First-epoch dominance, full batch (not the paper's setting).",
                    "verdict": (f"One GD step per epoch: the share {d['mean_first_epoch_share']:.2f} "
                                f"is close to 1/E = {1 / e:.3f} by construction, so it says "
                                f"nothing about the 0.3-0.7 band; mean cos(g_1, g_e) "
                                f"{d['mean_cos_to_first5']:.2f}."),
                    "ok": None})
    return out
