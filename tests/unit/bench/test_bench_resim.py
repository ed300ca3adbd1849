"""`saber bench resim`: what it refuses, with a message that says what to pass instead."""

from pathlib import Path

import pytest

from saber_bench.resim import ResimError, load_run, parse_vary
from saber_cli.main import main

RUN4 = Path(__file__).resolve().parents[3] / "docs" / "data" / "live-vllm-proof-run4"


def test_a_folder_that_is_not_a_proof_run_is_refused_with_what_it_needs(tmp_path, capsys):
    assert main(["bench", "resim", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--out folder of `saber bench live --engine vllm`" in capsys.readouterr().err


def test_a_missing_tokenizer_is_named(tmp_path, capsys):
    assert main(["bench", "resim", str(RUN4), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vllm-model/tokenizer.json is missing" in err and "--tokenizer" in err


def test_vary_sets_or_scales_one_field_and_refuses_the_rest():
    run = load_run(RUN4)
    p = run.profile
    field, variants = parse_vary("request_step_s=0.002,x2", p)
    assert field == "request_step_s"
    assert [v.request_step_s for _, v in variants] == [0.002, 0.0]  # x2 of the calibrated 0
    (_, ctx), = parse_vary("context_s_per_token=x1.5", p)[1]
    assert ctx.context_s_per_token == pytest.approx(1.5 * p.context_s_per_token)
    (_, dec), = parse_vary("decode_step_s=x1.1", p)[1]
    assert dec.decode_step_s == pytest.approx([1.1 * s for s in p.decode_step_s])
    assert dec.decode_batch_sizes == p.decode_batch_sizes
    for bad, says in [("nope=1", "FIELD one of"), ("request_step_s", "FIELD=V1"), ("request_step_s=fast", "not a number"),
                      ("decode_step_s=0.01", "scale factors only"), ("request_step_s=-1", "not a valid profile")]:
        with pytest.raises(ResimError, match=says):
            parse_vary(bad, p)


def test_the_live_noise_is_the_standard_error_of_a_cells_mean_over_its_seeds():
    from saber_bench.resim import live_se

    assert live_se({"goodput_per_seed": [0.98, 0.94, 0.61]}) == pytest.approx(11.72, abs=0.01)
    assert live_se({"goodput_per_seed": [0.5]}) == 0.0
    assert live_se({"goodput_per_seed": [0.7, 0.7, 0.7]}) == 0.0


def test_a_profile_at_another_speed_scales_every_engine_time_term():
    from saber_bench.live_vllm import at_speed

    p = load_run(RUN4).profile.model_copy(update={"request_step_s_per_seq": 4e-5})
    slow = at_speed(p, 0.8)
    assert slow.decode_step_s == pytest.approx([s / 0.8 for s in p.decode_step_s])
    for k in ("prefill_s_per_token", "context_s_per_token", "request_step_s_per_seq"):
        assert getattr(slow, k) == pytest.approx(getattr(p, k) / 0.8)
    assert slow.request_overhead_s == p.request_overhead_s  # outside the engine: not its speed
    assert at_speed(p, 1.0) is p and at_speed(p, float("nan")) is p
