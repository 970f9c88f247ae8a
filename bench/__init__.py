"""The benchmark of issue 3: `make bench` (python -m bench). See bench/__main__.py."""
