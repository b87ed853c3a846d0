"""The QEMU guest harness (tests/e2e, benchmarks/guest_fio): guest kernel cache,
initramfs, QEMU runner, back-ends.

kernel.py fetches and unpacks Debian's cloud kernel; initramfs.py packs busybox, the virtio
modules and /init; qemu.py runs one guest and parses its console; backends.py starts
qemu-storage-daemon, our devices and our supervisor; guest_scripts.py holds the guest-side
shell and the matching host-side checks; procs.py ends every process by pid.
"""
