"""Ratios against torch and effective bandwidth from one pytest-benchmark JSON file.

    python bench/summarize.py bench/results/cpu.json [--markdown]

Every ratio divides medians measured in the same run. Effective bandwidth is the bytes the
ideal fused pass must move (20 B/element for an SGD step with momentum, 12 B/element for an
accumulate: read grad and snapshot, write snapshot) over the median time; the copy row is
8 B/element over the median of a plain fp32 copy of the same size.
"""

import argparse
import json
from collections import defaultdict

BYTES = {"step": 20, "accumulate": 12, "copy": 8}
TARGETS = {  # (candidate, baseline, target ratio) from issue 3
    "step": [("fastscale_native", "torch_fused_norm_sched", 0.80), ("fastscale_native", "torch_fused", 1.05),
             ("fastscale_torch", "torch_fused_norm_sched", None), ("fastscale_native", "torch_foreach", None)],
    "accumulate": [("fastscale_native", "torch_norm_add", 0.80), ("fastscale_native", "torch_sub_norm_copy", None),
                   ("fastscale_torch", "torch_norm_add", None)],
}


def load(path):
    data = json.load(open(path))
    table = defaultdict(dict)  # (kind, size) -> candidate -> (median s, elements)
    for b in data["benchmarks"]:
        kind = b["group"].split()[0]
        info = b["extra_info"]
        table[(kind, info["size"])][info["candidate"]] = (b["stats"]["median"], info["elements"])
    return data, table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    args = parser.parse_args()
    data, table = load(args.json)
    machine = data.get("machine_info", {})
    print(f"# {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}, "
          f"{data.get('datetime', '')}\n")
    print("| group | candidate | median ms | GB/s effective | ratio vs | ratio | target |")
    print("| --- | --- | ---: | ---: | --- | ---: | --- |")
    for (kind, size), cands in sorted(table.items()):
        if kind not in TARGETS:
            continue
        copy = table.get(("step", size), {}).get("copy")
        for cand, (median, n) in sorted(cands.items()):
            if cand == "copy":
                continue
            print(f"| {kind} {size} | {cand} | {median * 1e3:.2f} | {BYTES[kind] * n / median / 1e9:.1f} | | | |")
        if copy:
            print(f"| {kind} {size} | copy (8 B/elem) | {copy[0] * 1e3:.2f} | {8 * copy[1] / copy[0] / 1e9:.1f} | | | |")
        for cand, base, target in TARGETS[kind]:
            if cand in cands and base in cands:
                ratio = cands[cand][0] / cands[base][0]
                verdict = "" if target is None else (f"<= {target}: " + ("met" if ratio <= target else "NOT met"))
                print(f"| {kind} {size} | {cand} | | | {base} | {ratio:.3f} | {verdict} |")


if __name__ == "__main__":
    main()
