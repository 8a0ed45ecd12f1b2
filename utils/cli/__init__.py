"""Commands a learner runs from a terminal (hand-written): `python -m utils.cli.chat`,
`python -m utils.cli.pretrain` and `python -m utils.cli.benchmark`. They build on every
chapter, and no chapter module imports them.
"""
