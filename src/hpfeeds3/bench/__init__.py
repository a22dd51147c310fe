"""hpfeeds-bench: a load generator for hpfeeds brokers that is not the bottleneck.

Stdlib only (the core package has no third-party dependency). See ``cli`` for
the scenarios and the access key a broker under test needs.
"""
