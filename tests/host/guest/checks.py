import os, subprocess, time
print("=== TEST-START", open("/proc/uptime").read().split()[0], flush=True)
def sh(c):
    p = subprocess.run(c, shell=True, capture_output=True, text=True)
    print(f"$ {c}\n{p.stdout}{p.stderr}", flush=True)
sh("cat /proc/self/cgroup; ls /sys/fs/cgroup | head -5")
sh("""systemd-run -p Delegate=yes --wait --pipe sh -c 'cat /proc/self/cgroup; d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); ls -la $d | head -5; python3 -c "import os,sys; d=sys.argv[1]; print(os.listxattr(d)); [print(a, os.getxattr(d,a)) for a in os.listxattr(d)]" $d'""")
sh("""systemd-run --wait --pipe sh -c 'd=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); python3 -c "import os,sys; d=sys.argv[1]; print(d, os.listxattr(d))" $d'""")
sh("/opt/vhost-supervisor/bin/vhost-supervisor --version; systemctl cat vhost-supervisor.service | head -3")
print("=== TEST-END", open("/proc/uptime").read().split()[0], flush=True)
