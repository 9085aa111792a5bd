"""Scripts that train toy networks with svconv and benchmark it.

Run one as ``python -m experiments.<name>``; ``python -m experiments.demo`` runs the four
toy-network experiments in quick mode.
"""
