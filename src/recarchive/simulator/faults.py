"""Fault profiles of the simulator, deterministic under the seed.

A fault hits a given request when a hash of ``(seed, fault, recording, attempt)`` falls under
the fault's rate, where *attempt* counts this recording's earlier requests of the same kind. So
the same seed always hits the same recordings on the same attempts, whatever the concurrency,
and a fault never repeats beyond :data:`MAX_FAULTY_ATTEMPTS` attempts: a client that retries
comes through every fault, while one that does not is caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

FAULTS = ("429", "500", "reset", "slow", "truncate", "expired", "notready", "404")
PROFILES: dict[str, tuple[str, ...]] = {
    "none": (),
    "flaky": ("500", "reset", "slow"),
    "ratelimit": ("429",),
    "media": ("truncate", "expired", "reset"),
    "chaos": ("429", "500", "reset", "slow", "truncate", "expired", "notready", "404"),
}
#: Share of recordings (or requests) each fault hits.
DEFAULT_RATES: dict[str, float] = {
    "429": 0.05,
    "500": 0.10,
    "reset": 0.05,
    "slow": 0.05,
    "truncate": 0.10,
    "expired": 0.10,
    "notready": 0.20,
    "404": 0.03,
}
#: A request-level fault hits at most this many attempts in a row of one recording.
MAX_FAULTY_ATTEMPTS = 2


class UnknownFaultError(ValueError):
    """A fault profile names a fault that does not exist."""


@dataclass(frozen=True)
class FaultProfile:
    """Which faults are on, and how often.

    Attributes:
        seed: Seed of every fault decision.
        faults: Names of the active faults (see :data:`FAULTS`).
        rates: Hit rate per fault.
        slow_seconds: Added latency of a ``slow`` response.
    """

    seed: int
    faults: frozenset[str] = frozenset()
    rates: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATES))
    slow_seconds: float = 0.3

    @classmethod
    def parse(cls, spec: str | Iterable[str], seed: int) -> FaultProfile:
        """Build a profile from a name (``chaos``) or a comma list (``500,slow``).

        Raises:
            UnknownFaultError: A name is neither a profile nor a fault.
        """
        names = [part.strip() for part in spec.split(",")] if isinstance(spec, str) else list(spec)
        faults: set[str] = set()
        for name in filter(None, names):
            if name in PROFILES:
                faults.update(PROFILES[name])
            elif name in FAULTS:
                faults.add(name)
            else:
                known = ", ".join([*PROFILES, *FAULTS])
                raise UnknownFaultError(f"unknown fault {name!r}; known: {known}")
        return cls(seed=seed, faults=frozenset(faults))

    def active(self, fault: str) -> bool:
        """True when ``fault`` is part of the profile."""
        return fault in self.faults

    def _draw(self, fault: str, key: str, attempt: int) -> float:
        digest = hashlib.blake2b(
            f"{self.seed}:{fault}:{key}:{attempt}".encode(), digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") / 2**64

    def hits(self, fault: str, key: str, attempt: int = 0) -> bool:
        """Decide whether ``fault`` hits request number ``attempt`` of ``key``.

        Args:
            fault: Fault name.
            key: What the request is about (recording ID and request kind).
            attempt: How many requests of this key came before (0 = first).
        """
        if fault not in self.faults or attempt >= MAX_FAULTY_ATTEMPTS:
            return False
        return self._draw(fault, key, 0) < self.rates.get(fault, 0.0) and (
            attempt == 0 or self._draw(fault, key, attempt) < 0.5
        )

    def may_hit(self, key: str) -> bool:
        """True when some active fault hits ``key``'s first attempt (so it may hit later ones).

        :meth:`hits` is False on every attempt of any other key: its attempts need no count.
        """
        return any(self._draw(f, key, 0) < self.rates.get(f, 0.0) for f in self.faults)

    def hits_recording(self, fault: str, recording_id: str) -> bool:
        """Decide a per-recording fault (``404``, ``notready``), the same on every request."""
        return fault in self.faults and self._draw(fault, recording_id, 0) < self.rates.get(
            fault, 0.0
        )
