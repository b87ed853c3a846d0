"""Coverage-guided fuzzing of every parser that takes hostile input.

``targets/`` holds one module per target; each exposes ``one_input(data)``,
which raises only for a bug (an expected, typed error is caught inside).
``run.py`` drives them with atheris (``make fuzz``); ``test_replay.py``
replays the seed corpus and every regression input under pytest, without
atheris (``make test``).  See README.md here.
"""
