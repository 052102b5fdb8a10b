"""GP rules for the tests: the config schema's defaults (the ``gp`` of the command line) under D-PSGD."""

import dataclasses

from fedepic.config import PurificationConfig
from strategies.gradient_purification import GradientPurification


def make_gp(**overrides) -> GradientPurification:
    """``GradientPurification`` with the schema's defaults, ``target="weights"`` (what ``auto`` is under
    dpsgd), no oracle, and ``overrides`` on top."""
    defaults = {**dataclasses.asdict(PurificationConfig()), "target": "weights", "oracle_round": None,
                "known_malicious": ()}
    defaults.pop("oracle_at")  # the config's fraction; the rule takes the round (fedepic.extensions.oracle_round)
    return GradientPurification(**{**defaults, **overrides})
