#!/usr/bin/env python3
"""Private memory of a trustline sidecar pair per idle connection, per sidecar.

  benches/peer/idle_memory.py BINARY POOLING CERT_DIR [N]

Starts an inbound and an outbound sidecar (explicit mode, identities from CERT_DIR as written by
../shared/peer-bench/certs.sh, pooling = POOLING, resumption off, one worker) and an echo backend
on ports 19101-19105, opens N (default 1000) connections through the pair with one 1 KiB round
trip each, keeps them open and prints, per sidecar, its memory before (smaps_rollup: Rss, Pss,
Anonymous; status: RssAnon, RssFile) and the growth per connection in KiB. Environment:
WRAP_IN="valgrind --tool=massif ..." runs the side named by WRAP_SIDE (in|out, default in)
under that command; START_WAIT seconds to wait for start (default 1).
"""
import asyncio, os, subprocess, sys, tempfile
if len(sys.argv) < 4:
    sys.exit(__doc__)
BIN, POOL, C = sys.argv[1], sys.argv[2], os.path.abspath(sys.argv[3])
N = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
if POOL not in ("true", "false"):
    sys.exit("POOLING must be true or false")
WORK = tempfile.mkdtemp(prefix="trustline-idle-memory.")
TD = "spiffe://example.org/ns/default/sa"
def conf(name, idt, admin, body):
    open(f"{WORK}/{name}.toml","w").write(f'''trust_domain = "example.org"
spiffe_id = "{TD}/{idt}"
bundle = "{C}/ca.crt"
resumption = false
pooling = {POOL}
workers = 1
[identity]
source = "files"
cert = "{C}/{idt}.crt"
key = "{C}/{idt}.key"
[admin]
listen = "127.0.0.1:{admin}"
{body}''')
conf("in","server",19101,'[inbound]\nlisten = "127.0.0.1:19102"\napp_address = "127.0.0.1:19103"\nallow = ["%s/client"]\n'%TD)
conf("out","client",19104,'[[service]]\nname = "server"\naddresses = ["127.0.0.1:19102"]\nspiffe_ids = ["%s/server"]\n[[listener]]\nlisten = "127.0.0.1:19105"\nservice = "server"\n'%TD)
def mem(pid):
    d={}
    for l in open(f"/proc/{pid}/smaps_rollup"):
        p=l.split()
        if p[0] in ("Rss:","Anonymous:","Pss:"): d[p[0]]=int(p[1])
    for l in open(f"/proc/{pid}/status"):
        if l.startswith(("RssAnon","RssFile")): d[l.split()[0]]=int(l.split()[1])
    return d
async def main():
    async def echo(r,w):
        while True:
            b=await r.read(4096)
            if not b: break
            w.write(b); await w.drain()
        w.close()
    srv=await asyncio.start_server(echo,"127.0.0.1",19103, backlog=2048)
    env=dict(os.environ, RUST_LOG="warn")
    wrap=os.environ.get("WRAP_IN","").split()
    ps=[subprocess.Popen((wrap if n==os.environ.get("WRAP_SIDE","in") else [])+[BIN,"sidecar","--config",f"{WORK}/{n}.toml"],env=env,stderr=subprocess.DEVNULL,stdout=subprocess.DEVNULL) for n in ("in","out")]
    await asyncio.sleep(float(os.environ.get("START_WAIT","1.0")))
    r,w=await asyncio.open_connection("127.0.0.1",19105); w.write(b"x"); await w.drain(); assert await r.read(1)==b"x"; w.close()
    await asyncio.sleep(1.0)
    before=[mem(p.pid) for p in ps]
    conns=[]
    for i in range(N):
        r,w=await asyncio.open_connection("127.0.0.1",19105)
        w.write(b"y"*1024); await w.drain(); await r.readexactly(1024); conns.append((r,w))
    await asyncio.sleep(1.0)
    after=[mem(p.pid) for p in ps]
    for n,b,a in zip(("in","out"),before,after):
        print(n, "before", b, "per-conn KiB:", {k:round((a[k]-b[k])/N,1) for k in b})
    if wrap: await asyncio.sleep(2)
    for p in ps: p.terminate()
    for p in ps: p.wait()
asyncio.run(main())
