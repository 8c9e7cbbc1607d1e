"""Measuring forgetting: conditions and scoring (context.py), the suites and their registry
(suites.py), attacks, post-hoc baselines, the story and the regime sweep."""
