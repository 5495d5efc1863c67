"""The test suite (a package, so that `tests.helpers` never resolves to a `tests` package
that some installed distribution ships at the top level of site-packages)."""
