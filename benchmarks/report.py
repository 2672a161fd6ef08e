"""Turn a pytest-benchmark JSON file into the README's tables, every figure a ratio.

    python -m pytest benchmarks --benchmark-json=bench.json
    python -m benchmarks.report bench.json

Throughput is bytes over the median round; each ratio divides it by its baseline's from
the same run, so a slow or noisy machine moves both sides together.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

# (operation, its baseline, what the baseline is, target ratio)
PAIRS = [
    ("test_native_scan[65536]", "test_baseline_xxh3_128", "xxhash XXH3-128, same buffer", 0.8),
    ("test_native_scan[4096]", "test_baseline_xxh3_128", "xxhash XXH3-128, same buffer", 0.8),
    ("test_full_snapshot", "test_baseline_zstd_T2", "`zstd -1 -T2` of the image", 0.7),
    ("test_incremental_snapshot", "test_baseline_cat", "`cat IMAGE > /dev/null`", 0.5),
    ("test_full_restore", "test_baseline_cp", "`cp` of the image", 0.5),
    (
        "test_device_full_snapshot[cold]",
        "test_device_baseline_zstd_T2[cold]",
        "`zstd -1 -T2` of the loop device, page cache dropped",
        0.9,
    ),
    (
        "test_device_full_snapshot[warm]",
        "test_device_baseline_zstd_T2[warm]",
        "`zstd -1 -T2` of the loop device, warm",
        0.9,
    ),
    (
        "test_device_incremental_snapshot[cold]",
        "test_device_baseline_dd[cold]",
        "`dd bs=16M` of the loop device, page cache dropped",
        0.9,
    ),
    (
        "test_device_incremental_snapshot[warm]",
        "test_device_baseline_dd[warm]",
        "`dd bs=16M` of the loop device, warm",
        0.9,
    ),
    (
        "test_device_restore[whole]",
        "test_device_baseline_dd_direct_write",
        "`dd bs=16M oflag=direct` of the image onto the device",
        0.8,
    ),
    (
        "test_device_restore[only-changed]",
        "test_device_baseline_dd_direct_write",
        "`dd bs=16M oflag=direct` of the image onto the device",
        0.8,
    ),
    (
        "test_s3_full_snapshot",
        "test_baseline_s3_parallel_upload",
        "bare parallel upload of the stored bytes, same client (S3)",
        0.8,
    ),
    (
        "test_s3_full_restore",
        "test_baseline_s3_ranged_download",
        "bare parallel ranged download of the packs, same client (S3)",
        0.8,
    ),
    (
        "test_remote_restore[batched]",
        "test_remote_restore[per-block]",
        "the same restore, one get per block, 2 ms per get",
        3.0,
    ),
]


def throughput(bench: dict[str, Any]) -> float:
    return float(bench["extra_info"]["bytes"]) / float(bench["stats"]["median"])


def single_file(benches: dict[str, Any]) -> None:
    """The single-file restore table: time next to a full restore, blocks, scaling."""
    files = sorted(
        (b for n, b in benches.items() if n.startswith("test_extract_one_file_cold[")),
        key=lambda b: b["extra_info"]["image_size"],
    )
    full = benches.get("test_full_restore_cold_of_the_same_snapshot")
    if not files:
        return
    print("\n| single-file restore, cold | time | blocks fetched | vs full restore |")
    print("|---|---|---|---|")
    for b in files:
        info = b["extra_info"]
        size = info["image_size"] >> 20
        ratio = (
            f"{b['stats']['median'] / full['stats']['median']:.4f}x"
            if full and b is files[0]
            else "-"
        )
        print(
            f"| {info['bytes'] / 2**20:.2f} MiB file of a {size} MiB image | "
            f"{b['stats']['median'] * 1000:.0f} ms | {info['blocks_fetched']} "
            f"({info['blocks_fetched_share']:.3%}) | {ratio} |"
        )
    if full:
        print(
            f"| full restore of the first image | {full['stats']['median'] * 1000:.0f} ms | "
            "all | 1x |"
        )
    if len(files) > 1:
        growth = files[-1]["stats"]["median"] / files[0]["stats"]["median"]
        print(f"\nlargest image over smallest, same kind of file: {growth:.2f}x the time")


def s3_requests(benches: dict[str, Any]) -> None:
    """What one file and one incremental cost on S3: time and requests."""
    rows = [b for n, b in benches.items() if n.startswith("test_s3_one_file_cold[")]
    inc = benches.get("test_s3_incremental_requests")
    if not rows and not inc:
        return
    print("\n| on S3 | time | requests |\n|---|---|---|")
    for b in rows:
        x = b["extra_info"]
        cache = b["name"].split("[")[1].rstrip("]")
        print(
            f"| one {x['bytes'] / 2**20:.2f} MiB file, page cache dropped, host cache: {cache} "
            f"({x['packs']} packs in the repository) | {b['stats']['median'] * 1000:.0f} ms "
            f"| {x['gets']} GETs; {_requests(x['requests'])} |"
        )
    if inc:
        x = inc["extra_info"]
        print(
            f"| incremental ({x['parts_of_new_data']} parts of new data) "
            f"| {inc['stats']['median'] * 1000:.0f} ms | {x['writes']} PUTs of {x['total']}; "
            f"{_requests(x['requests'])} |"
        )


def _requests(counted: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(counted.items(), key=lambda kv: -kv[1]))


PEER_OPERATIONS = [
    ("full", "full snapshot"),
    ("incremental", "incremental (2% of files rewritten)"),
    ("restore", "full restore, checked byte-identical"),
    ("one_file", "one 1 MiB file back (peers: full restore, loop mount, copy)"),
]


def peers(benches: dict[str, Any]) -> None:
    """bench_peers' tables: each peer's time, bytes stored per incremental and peak RSS as
    a ratio to blocksnap's in the same run (above 1x: the peer takes more), then the
    versions and settings."""
    tools: list[str] = []
    for name in benches:
        if name.startswith("test_peer_") and "[" in name:
            tool = name.split("[", 1)[1].rstrip("]")
            if tool not in tools:
                tools.append(tool)
    if "blocksnap" not in tools:
        return
    tools.remove("blocksnap")
    print("\n| peers, page cache warm | blocksnap | " + " | ".join(tools) + " |")
    print("|---|---|" + "---|" * len(tools))
    measures: list[tuple[str, Callable[[dict[str, Any]], float], str]] = [
        ("time", lambda b: float(b["stats"]["median"]), "{:.2f} s"),
        ("bytes stored", lambda b: float(b["extra_info"]["stored_bytes"]), "{:.1f} MiB"),
        ("peak RSS", lambda b: float(b["extra_info"]["peak_rss_mib"]), "{:.0f} MiB"),
    ]
    for op, label in PEER_OPERATIONS:
        own = benches.get(f"test_peer_{op}[blocksnap]")
        if own is None:
            continue
        for what, value, unit in measures:
            if what == "bytes stored" and op != "incremental":
                continue
            scale = 2**20 if what == "bytes stored" else 1
            cells = [unit.format(value(own) / scale)]
            for tool in tools:
                peer = benches.get(f"test_peer_{op}[{tool}]")
                cells.append(f"{value(peer) / value(own):.2f}x" if peer else "-")
            print(f"| {label}: {what} | " + " | ".join(cells) + " |")
    print("\n| tool | version | settings |\n|---|---|---|")
    for tool in ["blocksnap", *tools]:
        info = next(b["extra_info"] for n, b in benches.items() if n.endswith(f"[{tool}]"))
        print(f"| {tool} | {info['tool']} | {info['settings']} |")


def main(path: str) -> None:
    with open(path) as f:
        benches = {b["name"]: b for b in json.load(f)["benchmarks"]}
    print("| operation | baseline | ratio | target |\n|---|---|---|---|")
    for name, base, label, target in PAIRS:
        if name in benches and base in benches:
            ratio = throughput(benches[name]) / throughput(benches[base])
            print(f"| {name.removeprefix('test_')} | {label} | {ratio:.2f}x | {target}x |")
    single_file(benches)
    s3_requests(benches)
    peers(benches)
    synth, full = benches.get("test_synthesize"), benches.get("test_full_snapshot")
    gc1 = benches.get("test_gc_after_pruning_one_snapshot[1]")
    gc10 = benches.get("test_gc_after_pruning_one_snapshot[10]")
    hinted, unhinted = (
        benches.get("test_hinted_incremental_snapshot"),
        benches.get("test_incremental_snapshot"),
    )
    cold = (
        benches.get("test_cold_incremental[hinted]"),
        benches.get("test_cold_incremental[unhinted]"),
    )
    if synth or gc1 or hinted or cold[0]:
        print("\n| operation | compared with | time ratio | target |\n|---|---|---|---|")
    floor = benches.get("test_baseline_zstd_T2_of_the_change")
    if hinted and floor:
        ratio = hinted["stats"]["median"] / floor["stats"]["median"]
        print(
            f"| incremental given the changed extents, image cached | `zstd -1 -T2` and "
            f"`sync` of just the changed blocks | {ratio:.2f}x | - |"
        )
    for (h, u), how in (((hinted, unhinted), "cached"), (cold, "cold")):
        if h and u:
            ratio = h["stats"]["median"] / u["stats"]["median"]
            print(
                f"| incremental given the changed extents, image {how} | the same incremental "
                f"reading all | {ratio:.3f}x (1/{1 / ratio:.1f}) | <= 0.05x |"
            )
    if synth and full:
        ratio = synth["stats"]["median"] / full["stats"]["median"]
        print(f"| synthesize | full snapshot of the same image | {ratio:.4f}x | <= 0.01x |")
    if gc1 and gc10:
        ratio = gc10["stats"]["median"] / gc1["stats"]["median"]
        print(
            f"| gc after pruning one snapshot, 10 volumes | the same, 1 volume | {ratio:.2f}x "
            "| <= 1.5x |"
        )
    sizes = [b for b in benches.values() if b["name"].startswith("test_block_size")]
    if sizes:
        cat = benches.get("test_baseline_cat")
        print(
            "\n| block size | full: stored | full: map metadata | incremental: stored "
            "| incremental: map metadata | full MiB/s | incremental / cat |\n"
            "|---|---|---|---|---|---|---|"
        )
        for b in sorted(sizes, key=lambda b: b["extra_info"]["block_size"]):
            x = b["extra_info"]
            vs_cat = f"{throughput(b) / throughput(cat):.2f}x" if cat else "-"
            print(
                f"| {x['block_size'] >> 10} KiB | {x['full_stored'] / 2**20:.1f} MiB "
                f"| {x['full_metadata'] / 1024:.0f} KiB "
                f"| {x['incremental_stored'] / 2**20:.2f} MiB "
                f"| {x['incremental_metadata'] / 1024:.0f} KiB "
                f"| {x['bytes'] / x['full_seconds'] / 2**20:.0f} | {vs_cat} |"
            )
    memory = [b for b in benches.values() if b["name"].startswith("test_peak_memory")]
    if memory:
        ops = list(memory[0]["extra_info"]["peak_rss_mib"])
        print("\n| image | " + " | ".join(ops) + " |")
        print("|---" * (len(ops) + 1) + "|")
        for b in sorted(memory, key=lambda b: b["extra_info"]["image_mb"]):
            x = b["extra_info"]
            peaks = x["peak_rss_mib"]
            anon, file = x.get("peak_anon_mib"), x.get("peak_file_mib")
            cells = " | ".join(
                f"{peaks[op]:.0f} MiB"
                + (f" ({anon[op]:.0f} + {file[op]:.0f})" if anon and file else "")
                for op in ops
            )
            print(f"| {b['extra_info']['image_mb']} MiB | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1])
