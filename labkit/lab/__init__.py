"""The lab's machinery behind ``./lab``: nothing here is needed to use MisConv from Python.

- :mod:`labkit.lab.profiles`: run profiles (``profiles/*.yaml``), ``-p`` overrides, and the
  notebooks' parameters as papermill infers them, so every key is checked before anything runs;
- :mod:`labkit.lab.run_notebooks`: ``./lab run`` / ``sync`` / ``figures`` (papermill, jupytext);
- :mod:`labkit.lab.runplan`: what a run says and decides before it trains (its data, whether it is
  the profile's own run or an ad-hoc one and so where it writes, the sweep's plan);
- :mod:`labkit.lab.kernel`: the kernel those runs and ``./lab jupyter`` start;
- :mod:`labkit.lab.jupyter`: ``./lab jupyter`` (settings in ``.jupyter/``);
- :mod:`labkit.lab.nbstrip`: the git clean filter that keeps notebooks output-free in git;
- :mod:`labkit.lab.venv_check`: whether a virtualenv imports this checkout's labkit;
- :mod:`labkit.lab.notices`: notes a notebook shows about how it ran (e.g. offline data).

Importing this package imports none of them.
"""
