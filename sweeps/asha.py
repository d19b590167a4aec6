"""Ray Tune's ASHA, with its rungs printed as the racing scheduler prints its own: in the metric's
units. Ray's line (`Iter 20.000: -407.93`) shows a minimised metric negated, as ASHA stores it."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler

from record.states import trial_count


class Asha(ASHAScheduler):
    def debug_string(self) -> str:
        lines = [f"Using ASHA (reduction factor {self._reduction_factor:g}): num_stopped={self._num_stopped}"]
        for bracket in self._brackets:
            for rung, recorded in reversed(bracket._rungs):
                if rung >= self._max_t:
                    continue
                cutoff = bracket.cutoff(recorded)
                shown = "-" if cutoff is None else f"{self._metric_op * cutoff:.4g}"
                lines.append(
                    f"Rung {self._time_attr} {rung:g} ({trial_count(len(recorded))}): {self._metric} cut-off {shown}"
                )
        return "\n".join(lines)
