"""vhost-supervisor's supervision package.

``IS_VHOST_SUPERVISOR`` marks this package as ours: PyPI's ``supervisor``
(supervisord) installs a top-level package of the same name, and the
``vhost-supervisor`` launcher (``vhost_supervisor.py``) checks for the marker
before importing anything else from here.
"""

IS_VHOST_SUPERVISOR = True
