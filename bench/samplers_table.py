"""Markdown tables for docs/BENCHMARKS.md from bench/samplers_accuracy.py's JSON: the RMS table, each diffusers
scheduler's chosen configuration, the per-draw decomposition at one NFE, and the target ratios.

    .venv/bin/python bench/samplers_table.py [--json bench/samplers_accuracy.json] [--decompose-nfe 10]
"""

from __future__ import annotations

import argparse
import json

NFES = (5, 10, 20, 50)
# diffcli sampler → the peer rows that run the same algorithm
SAME_ALGORITHM = {
    "ddim": ["DDIM"], "euler": ["Euler", "EDMEuler", "euler"], "heun": ["Heun", "heun"],
    "dpmpp_2m": ["DPM-Solver++ 2M", "EDM DPM-Solver++ 2M", "dpmpp_2m"],
    "dpmpp_3m": ["DPM-Solver++ 3M", "EDM DPM-Solver++ 3M"], "unipc": ["UniPC"], "ipndm": ["LMS", "lms"],
}


def _cell(r: dict) -> str:
    v = f"{r['rms']:.3g}"
    return v + (f" ({r['nfe']})" if r["nfe"] != r["nfe_budget"] else "")


def _ci(r: dict, key: str) -> str:
    """' [lo, hi]': the paired-bootstrap 95% interval of a ratio, where the JSON has one."""
    return f" [{r[key][0]:.3f}, {r[key][1]:.3f}]" if key in r else ""


def untuned(r: dict) -> bool:
    return "tuned" not in r["schedule"] and "lower_order_final=False" not in r["schedule"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/samplers_accuracy.json")
    ap.add_argument("--decompose-nfe", type=int, default=10)
    args = ap.parse_args()
    rows = json.load(open(args.json))["rows"]
    table: dict[tuple, dict] = {}
    for r in rows:
        sched = "best on selection draws" if r["family"] == "diffusers" else r["schedule"]
        table.setdefault((r["family"], r["sampler"], sched), {})[r["nfe_budget"]] = r
    print("| family | sampler | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---|---|" + "---|" * len(NFES))
    order = {"k-diff": 0, "diffusers": 1, "diffcli": 2}
    for key in sorted(table, key=lambda k: (order[k[0]], k[1], k[2])):
        cells = [(_cell(table[key][n]) if n in table[key] else "—") for n in NFES]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")

    print("\nConfiguration each diffusers scheduler was run with (the best on the selection draws):")
    for (fam, name, _), by_nfe in table.items():
        if fam == "diffusers":
            print(f"- {name}: " + "; ".join(f"NFE {n} `{by_nfe[n]['schedule']}`" for n in NFES if n in by_nfe))

    n = args.decompose_nfe
    print(f"\nAt NFE {n}: RMS over all draws, the median per-draw RMS, and the draws that end on another mixture "
          "component than the reference (per-draw RMS > 0.1):\n")
    print("| family | sampler | schedule | RMS | median draw | draws off component |")
    print("|---|---|---|---|---|---|")
    for r in sorted((r for r in rows if r["nfe_budget"] == n and "median_draw_rms" in r),
                    key=lambda r: (order[r["family"]], r["sampler"], r["schedule"])):
        if r["family"] == "diffcli" and r["sampler"] not in ("unipc", "dpmpp_2m", "dpmpp_3m", "ddim", "ipndm"):
            continue
        print(f"| {r['family']} | {r['sampler']} | {r['schedule'][:60]} | {r['rms']:.4g} | "
              f"{r['median_draw_rms']:.3g} | {r['draws_off_component']} |")

    peers = [r for r in rows if r["family"] != "diffcli"]
    best = {m: min((r for r in peers if r["nfe_budget"] == m), key=lambda r: r["rms"]) for m in NFES}
    print("\nBest peer per NFE: " + ", ".join(f"NFE {m} {best[m]['family']} {best[m]['sampler']} "
                                              f"{best[m]['rms']:.4g}" for m in NFES))
    print("\nSame algorithm (diffcli's best untuned schedule / the peer's best configuration; > 1 loses):")
    for name, peer_names in SAME_ALGORITHM.items():
        parts = []
        for m in NFES:
            mine = min((r for r in rows if r["family"] == "diffcli" and r["sampler"] == name
                        and r["nfe_budget"] == m and untuned(r)), key=lambda r: r["rms"])
            theirs = min((r for r in peers if r["sampler"] in peer_names and r["nfe_budget"] == m),
                         key=lambda r: r["rms"])
            parts.append(f"{mine['rms'] / theirs['rms']:.4f}{_ci(mine, 'ratio_to_same_algorithm_ci95')} "
                         f"({mine['schedule'].replace(' (default)', '')})")
        print(f"- {name}: " + " / ".join(parts))
    print("\ndiffcli rows against the best peer at the same NFE (default and tuned):")
    for r in rows:
        if r["family"] == "diffcli" and ("(default)" in r["schedule"] and r["sampler"] == "unipc"
                                         or "tuned" in r["schedule"]):
            print(f"- {r['sampler']} {r['schedule']} NFE {r['nfe_budget']}: {r['rms']:.4g} = "
                  f"{r['rms'] / best[r['nfe_budget']]['rms']:.3f}×{_ci(r, 'ratio_to_best_peer_ci95')}")


if __name__ == "__main__":
    main()
