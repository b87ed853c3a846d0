"""The front-end side: what plays the VMM against our back-ends, for tests, benchmarks
and the ``probe`` command.

Why a package of its own: ``connection/`` is what a device process runs and ships in
every device child; a vhost-user driver, a virtio-blk driver, a supervisor runner and a
QEMU guest harness are tooling that drives those devices from outside, and the
benchmarks use them as much as the tests do.

- ``vhost_user``: the vhost-user front-end driver (``VhostUserFrontend``, ``DriverMemory``,
  ``DriverQueue``).
- ``virtio_blk``: virtio-blk requests on a ``DriverQueue`` (``BlockDriver``).
- ``probe``: the ``vhost-supervisor probe`` command.
- ``exercise``: one small checked I/O per device type (demo, tests, benchmarks).
- ``supervisor_process``: a supervisor in a subprocess, ready per sd_notify.
- ``qsd``: qemu-storage-daemon's command line, the reference back-end.
- ``guest``: the QEMU guest harness (kernel, initramfs, QEMU runner, back-ends).
"""
