"""Schedules equal DeepSpeed's pacing functions (tables generated with deepspeed 0.19.8's
CurriculumScheduler / random-LTD BaseScheduler), except where DeepSpeed would go below the minimum."""

import math

import pytest

from lightning_dataeff.schedules import (
    CustomSchedule,
    FixedDiscrete,
    FixedLinear,
    FixedRoot,
    LengthRamp,
    build_schedule,
)

STEPS = [0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 17, 25, 36, 37, 49, 50, 51, 99, 100, 101, 1000]


def curriculum(stype, lo, hi, **sc):
    return {"min_difficulty": lo, "max_difficulty": hi, "schedule_type": stype, "schedule_config": sc}


def rltd(lo, hi, require_steps, seq_per_step):
    return {
        "min_value": lo, "max_value": hi, "schedule_type": "fixed_linear",
        "schedule_config": {"require_steps": require_steps, "seq_per_step": seq_per_step},
    }


DEEPSPEED_TABLES = [
    (curriculum("fixed_linear", 8, 1024, total_curriculum_step=100, difficulty_step=8),
     [8, 16, 24, 32, 48, 56, 64, 96, 104, 112, 176, 256, 368, 376, 504, 512, 520, 1008, 1024, 1024, 1024]),
    (curriculum("fixed_root", 1, 100, total_curriculum_step=50, difficulty_step=1, root_degree=2),
     [1, 15, 20, 25, 29, 32, 35, 43, 45, 47, 58, 71, 85, 86, 99, 100, 100, 100, 100, 100, 100]),
    (curriculum("fixed_root", 64, 2048, total_curriculum_step=37, difficulty_step=16, root_degree=3),
     [64, 656, 800, 912, 1008, 1072, 1136, 1296, 1344, 1376, 1584, 1792, 2016] + [2048] * 8),
    # duration shorter than the number of increments: jumps, then holds the maximum
    (curriculum("fixed_linear", 8, 512, total_curriculum_step=3, difficulty_step=8), [8, 176, 344] + [512] * 18),
    (curriculum("fixed_discrete", 1, 3, difficulty=[1, 2, 3], max_step=[5, 10]), [1] * 6 + [2] * 3 + [3] * 12),
    (rltd(128, 1024, 400, 16),
     [128] * 7 + [144, 144, 144, 160, 176, 208, 208, 224, 240, 240, 336, 352, 352, 1024]),
]


@pytest.mark.parametrize("config,expected", DEEPSPEED_TABLES)
def test_equals_deepspeed_tables(config, expected):
    schedule = build_schedule(config)
    assert [schedule(s) for s in STEPS] == expected


def deepspeed_formula(step, lo, hi, total, mult, root=1.0):
    v = math.floor((step / total) ** (1 / root) * (hi - lo) + lo)
    return min(v - v % mult, hi)


@pytest.mark.parametrize("lo,hi,total,mult,root", [(8, 1024, 77, 8, 1), (5, 100, 13, 5, 2), (80, 2048, 1000, 8, 1.5)])
def test_equals_formula_where_not_below_min(lo, hi, total, mult, root):
    sched = FixedRoot(lo, hi, total, mult, root)
    for step in range(0, 2 * total, max(1, total // 50)):
        ref = deepspeed_formula(step, lo, hi, total, mult, root)
        if ref >= lo:
            assert sched(step) == ref, step
        else:  # DeepSpeed-old would drop below the minimum: smallest multiple >= min instead
            assert sched(step) == -(-lo // mult) * mult


def test_never_below_min_and_monotone():
    # random-LTD form, min 100, multiple 8: DeepSpeed's random-LTD scheduler returns 96 at step 0
    sched = build_schedule(rltd(100, 197, 10, 8))
    values = [sched(s) for s in STEPS]
    assert values == [104, 104, 112, 128, 136, 144, 152, 184, 197, 197] + [197] * 11
    sched = FixedLinear(8, 12, 5, step_size=16)  # smallest multiple >= min exceeds max: capped at max
    assert {sched(s) for s in range(10)} == {12}
    sched = FixedRoot(8, 2048, 1000, 64, 2)
    values = [sched(s) for s in range(0, 1200)]
    assert min(values) >= 8 and values == sorted(values) and values[-1] == 2048


@pytest.mark.parametrize("lo,hi,total,mult,root", [(8, 100, 10, 8, 1), (32, 197, 10, 8, 1), (1, 100, 7, 8, 2),
                                                 (100, 197, 10, 8, 1)])
def test_reaches_exact_max_at_end_of_ramp(lo, hi, total, mult, root):
    # DeepSpeed stays at 96 / 192 forever (hi is not a multiple of the rounding step); ours ends at hi
    sched = FixedRoot(lo, hi, total, mult, root)
    assert sched(total - 1) < hi and sched(total - 1) % mult == 0
    assert [sched(s) for s in (total, total + 1, 10 * total)] == [hi, hi, hi]


def test_build_schedule_accepts_deepspeed_keys_as_given():
    root = build_schedule(curriculum("fixed_root", 1, 100, total_curriculum_step=100, difficulty_step=1, root_degree=2))
    assert root(0) == 1 and root(100) == 100  # percentile curriculum from 1 %, not 8 %
    assert build_schedule(rltd(16, 64, 10, 8.0))(10) == 64  # integral floats from JSON


def test_length_ramp_cache_and_collapse_checks():
    ramp = LengthRamp(8, None, 8, total_steps=10, names={"max_value": "max_tokens", "step_size": "seq_per_step"})
    assert [ramp(s, 64) for s in (0, 5, 10)] == [8, 32, 64]
    assert [ramp(s, 100) for s in (0, 9, 10)] == [8, 88, 100] and ramp(5, 20) == 8
    assert LengthRamp(8, 64, 8, total_steps=10)(5, 20) == 20  # capped at the input length
    with pytest.warns(UserWarning, match=r"seq_per_step \(8\) is too large for inputs of 6 tokens"):
        assert LengthRamp(4, None, 8, total_steps=10, names={"step_size": "seq_per_step"})(0, 6) == 6
    assert ramp(0, 6) == 6  # shorter than the minimum: no ramp to collapse, no warning
    with pytest.raises(ValueError, match=r"seq_per_step \(8\) is too large for max_tokens \(6\)"):
        LengthRamp(4, 6, 8, names={"max_value": "max_tokens", "step_size": "seq_per_step"})
    with pytest.raises(ValueError, match="root_degree"):
        LengthRamp(4, 64, 8, root_degree=0)
    ramp.total_steps = 20  # re-resolving the duration drops the cached schedules
    assert ramp(10, 64) == 32
    with pytest.raises(RuntimeError, match="total_steps"):
        LengthRamp(4, 64, 8)(0, 64)


def test_resume_mid_warmup_is_stateless():
    sched = build_schedule(curriculum("fixed_linear", 8, 1024, total_curriculum_step=100, difficulty_step=8))
    full = [sched(s) for s in range(150)]
    again = build_schedule(curriculum("fixed_linear", 8, 1024, total_curriculum_step=100, difficulty_step=8))
    assert [again(s) for s in range(57, 150)] == full[57:]
    assert sched.end_step() == 100 and sched(sched.end_step()) == 1024


def test_custom_and_discrete_classes():
    c = CustomSchedule(lambda s: 8 + s, 8, 16, total_steps=8)
    assert c(3) == 11 and c.end_step() == 8
    with pytest.raises(ValueError, match="outside"):
        c(20)
    cfg = {"min_difficulty": 8, "max_difficulty": 64, "schedule_type": "custom"}
    assert build_schedule(cfg, custom_fn=lambda s: 64)(0) == 64
    d = FixedDiscrete((1, 2), (3,))
    assert (d.min_value, d.max_value, d.end_step()) == (1, 2, 4)


@pytest.mark.parametrize(
    "config,match",
    [
        ({"schedule_type": "fixed_linear"}, "min_difficulty"),
        (curriculum("fixed_linear", 8, 64), "schedule_config.total_curriculum_step"),
        (curriculum("fixed_linear", 8, 64, total_curriculum_step=0), "total_curriculum_step"),
        (curriculum("fixed_linear", 64, 8, total_curriculum_step=10), "min_difficulty"),
        (curriculum("fixed_linear", 0, 8, total_curriculum_step=10), "min_difficulty"),
        (curriculum("fixed_linear", 8, 64, total_curriculum_step=10, difficulty_step=0), "difficulty_step"),
        (curriculum("fixed_root", 8, 64, total_curriculum_step=10, difficulty_step=8), "root_degree"),
        (curriculum("fixed_root", 8, 64, total_curriculum_step=10, difficulty_step=8, root_degree=-1), "root_degree"),
        (curriculum("fixed_linear", 8, 64, total_curriculum_step=10), "schedule_config.difficulty_step"),
        (curriculum("fixed_root", 1, 100, total_curriculum_step=10, root_degree=2), "schedule_config.difficulty_step"),
        ({**rltd(8, 64, 10, 8), "schedule_config": {"require_steps": 10}}, "schedule_config.seq_per_step"),
        (curriculum("fixed_linear", 8, 64, total_curriculum_step=10, difficulty_steps=16),
         r"unknown key\(s\) \['difficulty_steps'\].*allowed: \['difficulty_step', 'total_curriculum_step'\]"),
        ({**rltd(8, 64, 10, 8), "schedule_config": {"require_steps": 10, "seq_per_step": 8,
                                                    "total_curriculum_step": 99}},
         r"unknown key\(s\) \['total_curriculum_step'\].*allowed: \['require_steps', 'seq_per_step'\]"),
        (curriculum("fixed_linear", 8, 64, total_curriculum_step=10, difficulty_step=8, root_degree=2),
         r"unknown key\(s\) \['root_degree'\]"),
        (curriculum("fixed_discrete", 1, 3, difficulty=[1, 3], max_step=[5], total_curriculum_step=9),
         r"unknown key\(s\) \['total_curriculum_step'\]"),
        (curriculum("fixed_cubic", 8, 64, total_curriculum_step=10), "schedule_type"),
        ({"min_difficulty": 8, "max_difficulty": 64}, "schedule_type"),
        (curriculum("fixed_discrete", 1, 3, difficulty=[1, 2]), "max_step"),
        (curriculum("fixed_discrete", 1, 3, difficulty=[1, 2], max_step=[1, 2]), "one more entry"),
        (curriculum("fixed_discrete", 1, 3, difficulty=[1, 2, 3], max_step=[5, 2]), "non-decreasing"),
        (rltd(8, 64, None, 8), "require_steps"),
        (rltd(8, 64, 10, -8), "seq_per_step"),
        (curriculum("custom", 8, 64), "custom_fn"),
        ([("min_difficulty", 1)], "mapping"),
    ],
)
def test_invalid_configs_name_the_key(config, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(config)


def test_bad_steps():
    sched = FixedLinear(8, 64, 10)
    for bad in (-1, 1.5, "3", True):
        with pytest.raises(ValueError, match="step"):
            sched(bad)
