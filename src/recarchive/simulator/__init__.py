"""The Bird API simulator: a real HTTP server on loopback for tests, benchmarks and the demo.

It serves the recordings endpoints of Bird's Voice API from a deterministic dataset
(:mod:`.dataset`), redirects ``.mp3`` requests to a separate media host with expiring signed
URLs, injects faults from a seeded profile (:mod:`.faults`), and logs every request it receives.
"""
