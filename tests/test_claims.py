"""magnets.claims: the paper's claims table, its verdicts against two standard errors, on results rows built here."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from magnets.claims import (
    CLAIMS,
    claims_table,
    distillation_markdown,
    distillation_table,
    front_table,
    is_static,
    main,
    search_table,
)  # fmt: skip
from magnets.results import RESULT_COLUMNS

GFLOPS = {"maskgit_12": 1.2, "magnets_3333": 0.4, "scale_down_3333": 0.4, "abrupt_6006": 0.45, "m8_12": 0.1}
WIDTHS = {"maskgit_12": "1", "maskgit_4": "1", "m2_12": "2", "m8_12": "8", "scale_down_3333": "1-2-4-8"}


def seed_row(schedule: str, cache: str, fid: float, seed: int, distill: str = "progressive", **overrides) -> dict:
    row = dict.fromkeys(RESULT_COLUMNS, "")
    row |= {
        "experiment": "fmnist_paper", "checkpoint": f"/runs/{distill}/checkpoints/last.ckpt", "distill": distill,
        "task": "class_cond", "schedule": schedule, "cache": cache, "guidance": 0.0, "samples": 2000,
        "extractor": "inception_offline", "seed": seed, "n_seeds": 1, "fid": fid, "rfid": 3.0,
        "gflops_per_sample": GFLOPS.get(schedule, 0.2), "widths": WIDTHS.get(schedule, "8-4-2-1"),
    }  # fmt: skip
    return row | overrides


def three_seeds(schedule: str, cache: str, mean: float, spread: float = 0.1, **kw) -> list[dict]:
    return [seed_row(schedule, cache, mean + d, seed, **kw) for seed, d in enumerate((-spread, 0.0, spread))]


def by_claim(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["claim"]: row for _, row in table.iterrows()}


def test_verdicts_follow_the_difference_against_two_standard_errors() -> None:
    rows = [
        *three_seeds("maskgit_12", "none", 10.0),
        *three_seeds("magnets_3333", "refresh_on_switch", 10.5),  # +5%: within the 10% margin, clearly
        *three_seeds("scale_down_3333", "refresh_on_switch", 12.0),  # worse than scale-up by far more than 2 SE
        *three_seeds("abrupt_6006", "refresh_on_switch", 10.55),  # 0.05 apart with std 0.1: not resolved
        *three_seeds("magnets_3333", "no_refresh", 9.0),  # better than refresh: claim (d) fails
    ]
    claims = by_claim(claims_table(pd.DataFrame(rows)))
    assert claims["a"]["verdict"] == "holds" and "3.00x fewer GFLOPs" in claims["a"]["why"]
    assert claims["b"]["verdict"] == "holds"
    assert claims["c"]["verdict"] == "not resolved"
    assert claims["d"]["verdict"] == "fails"
    assert claims["a"]["candidate_mean"] == pytest.approx(10.5)
    assert claims["a"]["candidate_std"] == pytest.approx(0.1)
    assert claims["a"]["candidate_seeds"] == 3 and claims["a"]["rfid"] == pytest.approx(3.0)
    for key in ("e (m_8)", "e (m_4)", "e (m_2)"):  # no rows of the two models' single widths
        assert claims[key]["verdict"] == "not measured"


def test_claim_a_fails_over_the_margin_or_under_the_gflops_ratio() -> None:
    base = three_seeds("maskgit_12", "none", 10.0)
    over = by_claim(claims_table(pd.DataFrame([*base, *three_seeds("magnets_3333", "refresh_on_switch", 12.2)])))
    assert over["a"]["verdict"] == "fails" and "+22.0%" in over["a"]["why"]
    near = by_claim(claims_table(pd.DataFrame([*base, *three_seeds("magnets_3333", "refresh_on_switch", 11.0, 1.0)])))
    assert near["a"]["verdict"] == "not resolved"
    costly = [seed_row("magnets_3333", "refresh_on_switch", 10.0, s, gflops_per_sample=0.6) for s in range(3)]
    assert by_claim(claims_table(pd.DataFrame([*base, *costly])))["a"]["verdict"] == "fails"


def test_claim_e_compares_the_two_models_and_reads_their_held_out_ce(tmp_path) -> None:
    rows = []
    for distill, fid, ce in (("progressive", 20.0, 2.5), ("none", 25.0, 2.9)):
        run = tmp_path / distill
        (run / "checkpoints").mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"val/loss/p8": ce, "val/loss/p1": 2.0}))
        rows += three_seeds("m8_12", "none", fid, distill=distill, checkpoint=str(run / "checkpoints" / "last.ckpt"))
    claims = by_claim(claims_table(pd.DataFrame(rows)))
    assert claims["e (m_8)"]["verdict"] == "holds"
    assert claims["e (m_8)"]["candidate_held_out_ce"] == pytest.approx(2.5)
    assert claims["e (m_8)"]["baseline_held_out_ce"] == pytest.approx(2.9)
    assert claims["e (m_4)"]["verdict"] == "not measured"


def test_the_newest_checkpoint_and_the_newest_row_of_each_seed_count() -> None:
    old = three_seeds("maskgit_12", "none", 50.0, checkpoint="/runs/old/checkpoints/last.ckpt")
    rerun = [seed_row("maskgit_12", "none", 99.0, 0), *three_seeds("maskgit_12", "none", 10.0)]  # seed 0 rerun: 10 - 0.1
    other_count = three_seeds("maskgit_12", "none", 70.0, samples=500)
    mean_rows = [seed_row("maskgit_12", "none", 0.0, "", aggregate="mean")]
    table = claims_table(pd.DataFrame([*old, *rerun, *other_count, *mean_rows]))
    row = by_claim(table)["a"]
    assert row["baseline_mean"] == pytest.approx(10.0) and row["baseline_seeds"] == 3
    assert math.isnan(row["candidate_mean"]) and row["verdict"] == "not measured"


def test_one_seed_has_no_standard_error_but_a_verdict() -> None:
    rows = [seed_row("magnets_3333", "refresh_on_switch", 10.0, 0), seed_row("scale_down_3333", "refresh_on_switch", 11.0, 0)]
    row = by_claim(claims_table(pd.DataFrame(rows)))["b"]
    assert row["verdict"] == "holds" and "one seed" in row["why"] and math.isnan(row["candidate_std"])


def test_cli_writes_the_table_and_names_a_bad_extractor(tmp_path, capsys) -> None:
    results = tmp_path / "results.csv"
    pd.DataFrame([*three_seeds("maskgit_12", "none", 10.0), *three_seeds("magnets_3333", "refresh_on_switch", 10.2)]).to_csv(
        results, index=False
    )
    assert main([str(results)]) == 0
    written = pd.read_csv(tmp_path / "claims_inception_offline.csv")
    assert list(written["claim"]) == [c.key for c in CLAIMS]
    markdown = (tmp_path / "claims_inception_offline.md").read_text()
    assert "| **a** magnets_3333 cached" in markdown and "**holds**" in markdown and "10.20 ± 0.10" in markdown
    assert "0 of 1 nested-schedule configurations lie strictly below the static front" in markdown
    assert pd.read_csv(tmp_path / "front_inception_offline.csv")["position"].tolist() == ["cheapest"]  # maskgit_12 costs 3x more
    distillation = pd.read_csv(tmp_path / "distillation_inception_offline.csv")
    assert distillation.loc[(distillation["distill"] == "progressive") & (distillation["width"] == 1), "mean"].item() == 10.0
    assert "| m_1 (maskgit_12, none) |" in markdown
    assert main([str(results), "--extractor", "inception_fidelity"]) == 2
    assert "extractors present: ['inception_offline']" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.csv")]) == 2


def test_front_places_each_nested_schedule_against_the_best_static_one_as_cheap() -> None:
    rows = [
        *three_seeds("maskgit_12", "none", 10.0),  # 1.2 GFLOPs
        *three_seeds("maskgit_4", "refresh_on_switch", 14.0, gflops_per_sample=0.35),
        *three_seeds("m2_12", "none", 13.0, gflops_per_sample=0.45),  # the better static point at <= 0.45
        *three_seeds("m8_12", "none", 30.0),  # 0.1 GFLOPs
        *three_seeds("magnets_3333", "refresh_on_switch", 11.0),  # 0.4: best static at <= 0.4 is maskgit_4 (14)
        *three_seeds("abrupt_6006", "refresh_on_switch", 13.1),  # 0.45: against m2_12 (13.0), within noise
        *three_seeds("scale_down_3333", "none", 40.0, gflops_per_sample=0.5),  # worse than m2_12
        *three_seeds("magnets_2222", "no_refresh", 20.0, gflops_per_sample=0.05),  # cheaper than every static point
    ]
    front = front_table(pd.DataFrame(rows)).set_index("schedule")
    assert list(front.index) == ["magnets_2222", "magnets_3333", "abrupt_6006", "scale_down_3333"]  # by GFLOPs
    assert front.loc["magnets_3333", "best_static"] == "maskgit_4/refresh_on_switch"
    assert front.loc["magnets_3333", "position"] == "below"
    assert front.loc["magnets_3333", "difference"] == pytest.approx(-3.0)
    assert front.loc["magnets_3333", "two_se"] == pytest.approx(2 * math.sqrt(2 * 0.01 / 3))
    assert front.loc["abrupt_6006", "best_static"] == "m2_12/none" and front.loc["abrupt_6006", "position"] == "on"
    assert front.loc["scale_down_3333", "position"] == "above"
    assert front.loc["magnets_2222", "position"] == "cheapest"


def test_a_searched_schedule_with_every_step_at_one_width_is_a_static_point_of_the_front() -> None:
    assert is_static("1") and is_static("8", "12") and is_static("8-4-2-1", "0-0-0-4") and is_static("8-4-2-1", "3-0-0-0")
    assert not is_static("8-4-2-1", "3-3-3-3") and not is_static("8-4-2-1", "0-0-1-3") and not is_static("8-4-2-1")
    rows = [
        *three_seeds("maskgit_12", "none", 10.0),  # 1.2 GFLOPs
        *three_seeds("search_0-0-0-4", "refresh_on_switch", 12.0, gflops_per_sample=0.35, steps_per_width="0-0-0-4"),
        *three_seeds("search_1-1-1-1", "refresh_on_switch", 13.0, gflops_per_sample=0.3, steps_per_width="1-1-1-1"),
        *three_seeds("magnets_3333", "refresh_on_switch", 14.0, steps_per_width="3-3-3-3"),  # 0.4 GFLOPs
    ]
    front = front_table(pd.DataFrame(rows)).set_index("schedule")
    assert list(front.index) == ["search_1-1-1-1", "magnets_3333"]  # search_0-0-0-4 is plain MaskGIT at K = 4
    assert front.loc["magnets_3333", "best_static"] == "search_0-0-0-4/refresh_on_switch"
    assert front.loc["magnets_3333", "position"] == "above"
    assert front.loc["search_1-1-1-1", "position"] == "cheapest"


def test_distillation_table_per_width_and_model_with_held_out_ce(tmp_path) -> None:
    rows = []
    for distill, run_name, widths in (("progressive", "prog", (8, 4, 2, 1)), ("none", "none", (8, 4, 2, 1))):
        run = tmp_path / run_name
        (run / "checkpoints").mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({f"val/loss/p{p}": 4.0 + p / 10 for p in widths}))
        for p in widths:
            schedule = "maskgit_12" if p == 1 else f"m{p}_12"
            fid = 10.0 + p + (2.0 if distill == "none" else 0.0)
            rows += three_seeds(schedule, "none", fid, distill=distill, checkpoint=str(run / "checkpoints" / "last.ckpt"))
        rows += three_seeds("magnets_3333", "refresh_on_switch", 12.0, distill=distill,
                            checkpoint=str(run / "checkpoints" / "last.ckpt"))  # fmt: skip
    single = tmp_path / "single_8"
    (single / "checkpoints").mkdir(parents=True)
    (single / "metrics.json").write_text(json.dumps({"val/loss/p8": 5.5}))
    rows += three_seeds("m8_12", "none", 30.0, distill="single", checkpoint=str(single / "checkpoints" / "last.ckpt"))
    table = distillation_table(pd.DataFrame(rows)).set_index(["distill", "width"])
    assert table.loc[("progressive", 8), "mean"] == pytest.approx(18.0)
    assert table.loc[("none", 8), "mean"] == pytest.approx(20.0) and table.loc[("none", 8), "n"] == 3
    assert table.loc[("none", 4), "held_out_ce"] == pytest.approx(4.4)
    assert table.loc[("progressive", 1), "schedule"] == "maskgit_12"
    assert table.loc[("single", 8), "mean"] == pytest.approx(30.0) and table.loc[("single", 8), "held_out_ce"] == 5.5
    assert table.loc[("single", 4), "n"] == 0 and math.isnan(table.loc[("single", 4), "mean"])  # not trained
    assert table.loc[("progressive", 0), "schedule"] == "magnets_3333" and table.loc[("none", 0), "mean"] == 12.0
    markdown = distillation_markdown(table.reset_index(), "inception_offline")
    assert "| m_8 (m8_12, none) | 4.800 | 18.00 ± 0.10 (3) | 4.800 | 20.00 ± 0.10 (3) | 5.500 | 30.00 ± 0.10 (3) |" in markdown
    assert "| m_4 (m4_12, none) | 4.400 | 14.00 ± 0.10 (3) | 4.400 | 16.00 ± 0.10 (3) | – | – |" in markdown
    assert "| nested (magnets_3333, refresh_on_switch) | – | 12.00 ± 0.10 (3) | – | 12.00 ± 0.10 (3) | – | – |" in markdown


def test_search_places_each_searched_schedule_against_the_shipped_front(tmp_path) -> None:
    rows = [
        *three_seeds("maskgit_12", "none", 10.0),  # 1.2 GFLOPs
        *three_seeds("magnets_3333", "refresh_on_switch", 12.0, steps_per_width="3-3-3-3"),  # 0.4: a shipped nested point
        *three_seeds("m8_12", "none", 30.0, steps_per_width="12"),  # 0.1
        # beyond: better than magnets_3333 at the same cost, by far more than 2 SE
        *three_seeds("search_2-2-4-4", "refresh_on_switch", 11.0, gflops_per_sample=0.4, steps_per_width="2-2-4-4"),
        # on: 0.05 from magnets_3333 with std 0.1; a static searched point (plain MaskGIT at K = 3) is a candidate too
        *three_seeds("search_0-0-0-3", "refresh_on_switch", 12.05, gflops_per_sample=0.45, steps_per_width="0-0-0-3"),
        seed_row("search_6-2-2-2", "refresh_on_switch", 31.0, 0, gflops_per_sample=0.2, steps_per_width="6-2-2-2"),
        seed_row("search_12-0-0-0", "refresh_on_switch", 40.0, 0, gflops_per_sample=0.05, steps_per_width="12-0-0-0"),
    ]
    search = search_table(pd.DataFrame(rows)).set_index("schedule")
    assert list(search.index) == ["search_12-0-0-0", "search_6-2-2-2", "search_2-2-4-4", "search_0-0-0-3"]
    assert search.loc["search_2-2-4-4", "best_shipped"] == "magnets_3333/refresh_on_switch"  # nested shipped count
    assert search.loc["search_2-2-4-4", "position"] == "below"
    assert search.loc["search_2-2-4-4", "difference"] == pytest.approx(-1.0)
    assert search.loc["search_0-0-0-3", "position"] == "on"
    assert search.loc["search_6-2-2-2", "best_shipped"] == "m8_12/none"
    assert search.loc["search_6-2-2-2", "position"] == "above" and math.isnan(search.loc["search_6-2-2-2", "two_se"])
    assert search.loc["search_12-0-0-0", "position"] == "cheapest"
    # The static front counts search_0-0-0-3 as a static point; the shipped front never holds a searched one.
    assert front_table(pd.DataFrame(rows)).set_index("schedule").loc["magnets_3333", "best_static"] == "m8_12/none"

    results = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    assert main([str(results)]) == 0
    assert pd.read_csv(tmp_path / "search_inception_offline.csv")["position"].tolist() == [
        "cheapest", "above", "below", "on",
    ]  # fmt: skip
    markdown = (tmp_path / "claims_inception_offline.md").read_text()
    assert "1 of 4 searched-schedule configurations lie strictly below the shipped front, 1 on it" in markdown
    assert "| search_2-2-4-4/refresh_on_switch | 0.400 | 11.00 ± 0.10 (3) | magnets_3333/refresh_on_switch |" in markdown
    row = "| search_6-2-2-2/refresh_on_switch | 0.200 | 31.00 (1) | m8_12/none | 0.100 | 30.00 ± 0.10 "
    assert row + "| +1.00 (one seed: by sign) | **above** |" in markdown

    pd.DataFrame(rows[:9]).to_csv(results, index=False)  # no searched rows: no search table
    (tmp_path / "search_inception_offline.csv").unlink()
    assert main([str(results)]) == 0 and not (tmp_path / "search_inception_offline.csv").exists()


def test_policies_table_places_each_policy_against_the_static_front(tmp_path) -> None:
    """Routing on a static schedule, a guided decode and a sandwich order are policies; the plain ones form the front."""
    rows = [
        *three_seeds("maskgit_3", "refresh_on_switch", 18.0, gflops_per_sample=0.33, widths="1"),
        *three_seeds("maskgit_4", "refresh_on_switch", 17.0, gflops_per_sample=0.42, widths="1"),
        # maskgit_4 routed: cheaper than maskgit_4, better than maskgit_3 (the best static as cheap) by 0.6 > 2 SE
        *three_seeds(
            "maskgit_4", "refresh_on_switch", 17.4, gflops_per_sample=0.36, widths="1", policy="route=confidence:8:0.5"
        ),  # fmt: skip
        # guided with the unconditional pass narrow: 0.40 GFLOPs, 17.1; maskgit_3's 18.0 is beaten, but plain guidance
        # at K = 2 (both passes full width, a static point of the front) gives 16.5 at 0.38: above the front
        *three_seeds(
            "maskgit_4", "refresh_on_switch", 17.1, gflops_per_sample=0.40, widths="1", guidance=1.0, policy="guidance_width=8"
        ),  # fmt: skip
        *three_seeds("maskgit_2", "refresh_on_switch", 16.5, gflops_per_sample=0.38, widths="1", guidance=1.0),
        # plain guidance at K = 4: a static point, not a policy
        *three_seeds("maskgit_4", "refresh_on_switch", 15.0, gflops_per_sample=0.84, widths="1", guidance=1.0),
        # a sandwich at 0.42 GFLOPs, 17.05 against maskgit_4's 17.0: on the front
        *three_seeds(
            "sandwich_111", "refresh_on_switch", 17.05, gflops_per_sample=0.42, widths="4-1-2", steps_per_width="1-1-1"
        ),  # fmt: skip
        # a scale-up nested schedule: not a policy, absent from the table
        *three_seeds("magnets_3333", "refresh_on_switch", 20.0, gflops_per_sample=0.49, widths="8-4-2-1"),
    ]
    from magnets.claims import policies_table

    table = policies_table(pd.DataFrame(rows))
    by_label = {(r["schedule"], r["policy"], r["guidance"]): r for _, r in table.iterrows()}
    assert set(by_label) == {
        ("maskgit_4", "route=confidence:8:0.5", 0.0), ("maskgit_4", "guidance_width=8", 1.0), ("sandwich_111", "", 0.0)
    }  # fmt: skip
    routed = by_label[("maskgit_4", "route=confidence:8:0.5", 0.0)]
    assert routed["best_static"] == "maskgit_3/refresh_on_switch"
    assert routed["difference"] == pytest.approx(-0.6) and routed["position"] == "below"
    narrow = by_label[("maskgit_4", "guidance_width=8", 1.0)]
    assert narrow["best_static"] == "maskgit_2/refresh_on_switch/w=1" and narrow["position"] == "above"
    assert narrow["difference"] == pytest.approx(0.6)
    sandwich = by_label[("sandwich_111", "", 0.0)]
    # an unguided policy meets the unguided front only: maskgit_4 plain, not the guided maskgit_2
    assert sandwich["best_static"] == "maskgit_4/refresh_on_switch" and sandwich["position"] == "on"
    # The routed static schedule is not a static point: maskgit_3's front value stays the plain one.
    assert routed["best_static_mean"] == pytest.approx(18.0)
    # The CLI writes the fifth table.
    results = tmp_path / "results.csv"
    pd.DataFrame(rows).to_csv(results, index=False)
    assert main([str(results)]) == 0
    written = pd.read_csv(tmp_path / "policies_inception_offline.csv")
    assert len(written) == 3 and set(written["position"]) == {"below", "above", "on"}


def test_results_without_a_policy_column_read_as_plain_decodes() -> None:
    rows = pd.DataFrame([*three_seeds("maskgit_12", "none", 10.0), *three_seeds("magnets_3333", "refresh_on_switch", 10.5)])
    table = front_table(rows.drop(columns=["policy"]))
    assert list(table["schedule"]) == ["magnets_3333"] and table["policy"].tolist() == [""]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty: not a results file"),
        (b"\xff\xfe\x00s\x00c\x00h\x00e\x00d\x00\n", "is not UTF-8 text"),
        (b"schedule,fid\nmaskgit_12,10.0\n", "lacks the column(s) extractor, aggregate, samples, fvd, distill, cache"),
        (b'schedule,fid\n"maskgit_12,10.0\n', "is not a readable CSV"),
    ],
    ids=["empty", "utf16", "missing-columns", "unterminated-quote"],
)
def test_claims_refuse_a_file_that_is_not_a_results_file_in_one_line(tmp_path, capsys, content, expected) -> None:
    results = tmp_path / "results.csv"
    results.write_bytes(content)
    assert main([str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {results}") and expected in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("claims_*"))  # nothing written
