"""A group holds a stage's values only while a later stage still reads them.

A group of 48 detectors carries hundreds of megabytes per stage (history
frames, stamps, alert bytes); keeping every stage's values until the group
ends puts them all in memory at once.
"""

from __future__ import annotations

import gc
import weakref

from flows.stages import PIPELINE, RECOVERY, GroupResult, Stage, last_uses, run_group, run_table


class Payload:
    """A stand-in for a stage's per-detector value that a weak reference can watch."""

    def __init__(self, name: str, det: int):
        self.name, self.det = name, det


def test_last_uses_of_the_pipeline_tables():
    uses = last_uses(PIPELINE)
    names = [s.name for s in PIPELINE]
    # the history and the stamps are last read when the alerts are packaged
    assert uses["load"] == uses["cutout"] == names.index("package")
    # the calibrated catalogue is read only by the stage after it (solar-system association)
    assert uses["calibrate"] == names.index("calibrate") + 1
    assert "produce" not in uses
    assert last_uses(RECOVERY) == {"recover": 1}


def test_values_are_released_after_their_last_reader():
    alive: dict[str, list[weakref.ref]] = {}

    def make(name):
        def run(ctx, det, **inputs):
            value = Payload(name, det)
            alive.setdefault(name, []).append(weakref.ref(value))
            return value, {}

        return run

    table = (
        Stage("a", make("a")),
        Stage("b", make("b"), {"x": "a"}),
        Stage("c", make("c"), {"y": "b"}),
        Stage("d", make("d"), {"z": "c", "w": "b"}),
        Stage("e", make("e"), {"v": "d"}),
    )
    seen_alive: dict[str, set[str]] = {}

    def call(stage, ctx, detectors, inputs) -> GroupResult:
        gc.collect()
        seen_alive[stage.name] = {
            name for name, refs in alive.items() if any(r() is not None for r in refs)
        }
        return run_group(stage, ctx, detectors, inputs)

    class Ctx:  # run_group reads only the orchestration settings of a cached stage
        config = None

        class visit:  # mirrors StageContext.visit
            visit = 1

    out = run_table(table, Ctx(), [1, 2], call)
    # "a" is last read by "b": gone before "c" runs; "b" is read by "c" and "d": alive for "d"
    assert seen_alive["c"] == {"b"}
    assert seen_alive["d"] == {"b", "c"}
    assert seen_alive["e"] == {"d"}
    assert set(out) == set("abcde")
    assert all(not isinstance(v, str) for v in out.values())
