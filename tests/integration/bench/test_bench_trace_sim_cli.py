"""`saber bench sim --trace` end to end on files the test writes (BurstGPT, Mooncake), with an SLA
file and a class rule; and clear errors for bad input."""

import json
import random

from saber_cli.main import main


def _mooncake(path, n=120):
    rng = random.Random(1)
    t = 0
    with open(path, "w") as f:
        for _ in range(n):
            t += int(rng.expovariate(1 / 400))
            f.write(json.dumps({"timestamp": t, "input_length": rng.randint(200, 3000),
                                "output_length": rng.randint(5, 80), "hash_ids": [1, 2]}) + "\n")
    return path


def test_sim_trace_with_sla_file_and_class_rule(tmp_path):
    trace = _mooncake(tmp_path / "trace.jsonl")
    sla = tmp_path / "sla.yaml"
    sla.write_text("classes:\n  - {name: short, deadline_seconds: 1.5, ttft_seconds: 0.5}\n"
                   "  - {name: long, deadline_seconds: 4.0}\ndefault_class: long\n")
    out = tmp_path / "out"
    rc = main(["bench", "sim", "--trace", str(trace), "--sla", str(sla), "--class-rule", "prompt_tokens:short@1500,long",
               "--rates", "2,6", "--policies", "static-20,saber,saber-oracle", "--seeds", "1", "--jobs", "1",
               "--no-progress", "--out", str(out)])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["meta"]["evidence"] == "sim on the paper profile" and s["meta"]["requests"] == 120
    cells = [c for c in s["cells"] if c["policy"] == "saber"]
    assert sorted(c["rate"] for c in cells) == [2.0, 6.0]
    assert set(cells[0]["attainment"]) == {"short", "long"}
    assert {"miss_ttft", "miss_e2e", "miss_rejected"} <= set(cells[0])
    assert "evidence: **sim on the paper profile**" in (out / "report.md").read_text()


def test_burstgpt_speedup_and_bad_input(tmp_path, capsys):
    p = tmp_path / "burst.csv"
    rows = ["Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type"]
    rows += [f"{i * 2},ChatGPT,{300 + 7 * i},{10 + i % 30},0,Conversation log" for i in range(80)]
    p.write_text("\n".join(rows) + "\n")
    out = tmp_path / "o"
    assert main(["bench", "sim", "--trace", str(p), "--speedup", "4", "--policies", "static-10,saber", "--seeds", "1",
                 "--jobs", "1", "--no-progress", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["meta"]["trace_mean_rate"] == 0.5 and {c["rate"] for c in s["cells"]} == {2.0}
    bad = tmp_path / "bad.csv"
    bad.write_text("foo,bar\n1,2\n")
    assert main(["bench", "sim", "--trace", str(bad), "--no-progress", "--out", str(out)]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
