#!/usr/bin/env python3
"""PNG plots of a tests/bench run: python3 tests/bench/plot.py RESULTS_DIR OUT_DIR

Reads what tests/bench/all leaves in RESULTS_DIR (cold-start.tsv, warm-guest.tsv,
memory.tsv, warm-fuse.txt; any may be missing) and writes cold-start.png, warm.png,
memory.png into OUT_DIR. Needs matplotlib (pip install matplotlib).
"""
import csv
import os
import re
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def cold_start(res, out):
    rs = rows(os.path.join(res, "cold-start.tsv"))
    if not rs:
        return
    modes = []
    for r in rs:
        if r["mode"] not in modes:
            modes.append(r["mode"])
    med = lambda m, k: statistics.median(float(r[k]) for r in rs if r["mode"] == m)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(modes))
    dl = [med(m, "download_s") for m in modes]
    st = [med(m, "startup_s") for m in modes]
    gu = [med(m, "guest_s") for m in modes]
    ax1.bar(x, dl, label="download (mode i)", color="#bbbbbb")
    ax1.bar(x, st, bottom=dl, label="daemon start-up (manifest)", color="#8fb3d9")
    ax1.bar(x, gu, bottom=[a + b for a, b in zip(dl, st)], label="workload in the guest", color="#2f6fad")
    for i, m in enumerate(modes):
        tot = dl[i] + st[i] + gu[i]
        ax1.text(i, tot + 0.2, f"{tot:.1f} s", ha="center", fontsize=8)
    ax1.set_xticks(list(x), modes, rotation=20)
    ax1.set_ylabel("seconds (median)")
    ax1.set_title("Time until the workload is done (guest boot excluded)")
    ax1.legend(fontsize=8)
    link = [med(m, "link_bytes") / 1e6 for m in modes]
    ax2.bar(x, link, color="#2f6fad")
    img = float(rs[0]["link_bytes"]) / float(rs[0]["fraction"]) / 1e6 if float(rs[0]["fraction"]) else None
    for i, v in enumerate(link):
        pct = f" ({100 * v / img:.0f}%)" if img else ""
        ax2.text(i, v + 1, f"{v:.0f} MB{pct}", ha="center", fontsize=8)
    if img:
        ax2.axhline(0.15 * img, color="red", linestyle="--", linewidth=1, label="15% of the image")
        ax2.legend(fontsize=8)
    ax2.set_xticks(list(x), modes, rotation=20)
    ax2.set_ylabel("MB over the emulated link")
    ax2.set_title("Bytes over the link")
    r0 = rs[0]
    fig.suptitle(f"Cold start, Debian minbase + python3, {r0['mbit']} Mbit/s, {r0['rtt_ms']} ms RTT (QEMU TCG)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cold-start.png"), dpi=110)


def warm(res, out):
    panels = []
    fuse = os.path.join(res, "warm-fuse.txt")
    if os.path.exists(fuse):
        vals, on = [], False
        for line in open(fuse):
            if line.startswith("# warm cache"):
                on = True
            if line.startswith("# N incfsd"):
                break
            if not on:
                continue
            m = re.match(r"^(\S+)\s+([\d.]+)\s+(\S+)\s+([\d.]+)\s+\S+\s+([\d.]+)x", line)
            if m:
                vals.append((m.group(1), float(m.group(2)), float(m.group(4)), m.group(3)))
        if vals:
            panels.append(("1(a) FUSE over vhost-user, no guest", vals))
    g = rows(os.path.join(res, "warm-guest.tsv"))
    if g:
        panels.append(("1(b) inside a QEMU guest", [(r["workload"], float(r["incfsd"]), float(r["virtiofsd"]), r["unit"]) for r in g]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (title, vals) in zip(axes[0], panels):
        x = range(len(vals))
        ratio = [a / b for _, a, b, _ in vals]
        ax.bar([i - 0.2 for i in x], ratio, width=0.4, label="incfsd", color="#2f6fad")
        ax.bar([i + 0.2 for i in x], [1.0] * len(vals), width=0.4, label="virtiofsd", color="#bbbbbb")
        for i, (w, a, b, u) in enumerate(vals):
            ax.text(i - 0.2, ratio[i] + 0.02, f"{a:.0f}", ha="center", fontsize=7)
            ax.text(i + 0.2, 1.02, f"{b:.0f}", ha="center", fontsize=7)
        ax.set_xticks(list(x), [f"{w}\n({u})" for w, _, _, u in vals], fontsize=8)
        ax.axhline(1.0, color="red", linestyle="--", linewidth=1)
        ax.set_ylabel("relative to virtiofsd (higher is better)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("Warm cache: incfsd vs virtiofsd (absolute figures on the bars)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "warm.png"), dpi=110)


def memory(res, out):
    rs = rows(os.path.join(res, "memory.tsv"))
    if not rs:
        return
    r = rs[-1]
    mib = lambda k: float(r[k]) / 1024
    manifest = float(r["manifest_bytes"]) / 2**20
    labels = ["after start-up\n(VmRSS)", "max own\n(RssAnon+RssFile)", "max RssAnon", "max RssShmem\n(guest RAM, mapped)"]
    vals = [mib("rss_idle_kb"), mib("own_max_kb"), mib("anon_max_kb"), mib("shmem_max_kb")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(range(len(vals)), vals, color=["#8fb3d9", "#2f6fad", "#2f6fad", "#bbbbbb"])
    for i, v in enumerate(vals):
        ax.text(i, v + 5, f"{v:.0f} MiB", ha="center", fontsize=8)
    ax.axhline(64 + manifest, color="red", linestyle="--", linewidth=1, label=f"target: 64 MiB + manifest ({manifest:.1f} MiB)")
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    gib = float(r["tree_bytes"]) / 2**30
    ax.set_title(f"incfsd run memory, {int(r['files']):,} files / {gib:.2f} GiB image, guest reads all of it")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "memory.png"), dpi=110)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    res, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    cold_start(res, out)
    warm(res, out)
    memory(res, out)


if __name__ == "__main__":
    main()
