"""systemd unit files shipped with the package (printed by ``vhost-supervisor systemd-units``)."""
