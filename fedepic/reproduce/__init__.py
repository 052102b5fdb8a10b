"""Replays of published experiments (fedepic issue 33): the published figures (``published.json``,
loaded by ``fedepic.reproduce.published``) and the authors' protocols (``PROTOCOLS.md``)."""
