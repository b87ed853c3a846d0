"""End-to-end tests: a real QEMU guest against real vhost-user back-ends."""
