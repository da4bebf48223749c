"""What the fake's `qstat` prints: PBS's JSON document and its default table (pure functions)."""

from __future__ import annotations

import json
import time

from parsl_aurora.fake.pbs import PBS_VERSION, SERVER


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def as_pbs(job: dict, now: float) -> dict:
    """One job in the shape of `qstat -f -F json`: which keys appear depends on the state."""
    ncpus = job["ncpus"]
    env = job["env"]
    out: dict = {
        "Job_Name": job["name"], "Job_Owner": f"{job['owner']}@{SERVER}",
        "job_state": job["state"], "queue": job["queue"], "server": SERVER,
    }
    if job["account"]:
        out["Account_Name"] = job["account"]
    out.update({
        "Checkpoint": "u", "ctime": time.ctime(job["ctime"]),
        "Error_Path": f"{SERVER}:{job['stderr']}",
        "Hold_Types": job.get("hold", "n"), "Join_Path": job["join"],
        "Keep_Files": job.get("keep", "n"), "Mail_Points": "a",
        "mtime": time.ctime(job["mtime"]), "Output_Path": f"{SERVER}:{job['stdout']}",
        "Priority": 0, "qtime": time.ctime(job["ctime"]), "Rerunable": "True",
        "Resource_List": {**job["resources"], "ncpus": ncpus * job["nodes"],
                          "nodect": job["nodes"],
                          "place": job["resources"].get("place", "free"),
                          "select": job["select"], "walltime": _hms(job["seconds"])},
    })
    if job["stime"]:
        out["stime"] = time.ctime(job["stime"])
    if job.get("pid"):  # started a process: a start that failed has no host
        out["exec_host"] = "+".join(f"{h}/0*{ncpus}" for h in job["hosts"])
        out["exec_vnode"] = "+".join(f"({h}:ncpus={ncpus})" for h in job["hosts"])
        out["resources_used"] = {"ncpus": ncpus * job["nodes"],
                                 "walltime": _hms((job["etime"] or now) - job["stime"])}
        out["session_id"] = job.get("pid", 0)
        out["jobdir"] = env.get("HOME", "/")
    if job["state"] == "F" or (job["state"] == "H" and job["etime"]):
        out["obittime"] = time.ctime(job["etime"])
    out["substate"] = job["substate"]
    out["Variable_List"] = {k: v for k, v in env.items() if k.startswith("PBS_O_")} | {
        "PBS_O_WORKDIR": job["workdir"], "PBS_O_SYSTEM": "Linux", "PBS_O_QUEUE": job["queue"],
        "PBS_O_HOST": SERVER}
    if job["comment"]:
        out["comment"] = job["comment"]
    out["etime"] = time.ctime(job["ctime"])
    if job["stime"]:
        out["run_count"] = job.get("run_count", 0) + (1 if job.get("pid") else 0)
    if job["exit_status"] is not None and job["state"] in ("E", "F", "H"):
        out["Exit_status"] = job["exit_status"]
    out["Submit_arguments"] = job["submit_args"]
    out["project"] = "_pbs_project_default"
    out["Submit_Host"] = SERVER
    return out


def document(jobs: list[dict], now: float | None = None) -> str:
    """`qstat -f -F json`: tab-indented, `":\\t"` separators, no "Jobs" key when none is left."""
    now = time.time() if now is None else now
    doc: dict = {"timestamp": int(now), "pbs_version": PBS_VERSION, "pbs_server": SERVER}
    if jobs:
        doc["Jobs"] = {j["id"]: as_pbs(j, now) for j in jobs}
    return json.dumps(doc, indent="\t", separators=(",", ":\t")) + "\n"


def short_id(job_id: str) -> str:
    """The id as the default table shows it: server name cut to its first label, 17 wide."""
    seq, _, server = job_id.partition(".")
    text = f"{seq}.{server.split('.')[0]}"
    return text if len(text) <= 17 else text[:16] + "*"


def table(jobs: list[dict], now: float | None = None) -> str:
    """`qstat`'s default listing."""
    if not jobs:
        return ""
    now = time.time() if now is None else now
    lines = ["Job id            Name             User              Time Use S Queue",
             "----------------  ---------------- ----------------  -------- - -----"]
    for j in jobs:
        used = _hms((j["etime"] or now) - j["stime"]) if j["stime"] else "0"
        lines.append(f"{short_id(j['id']):<17} {j['name'][:16]:<16} {j['owner'][:16]:<16}  "
                     f"{used:>8} {j['state']} {j['queue']:<15}")
    return "\n".join(lines) + "\n"


def _cut(text: str, width: int) -> str:
    """PBS's alternate listing cuts a long field to WIDTH - 1 characters and a `*`."""
    return text if len(text) <= width else text[:width - 1] + "*"


def _hm(seconds: float) -> str:
    m = int(seconds) // 60
    return f"{m // 60:02d}:{m % 60:02d}"


def alternate(jobs: list[dict], now: float | None = None) -> str:
    """`qstat -u USER`: PBS's alternate listing, headed by the server's name (empty when no job
    is listed). Job names are cut to 9 characters and a `*`: enough for a parsl-aurora run tag."""
    if not jobs:
        return ""
    now = time.time() if now is None else now
    lines = ["", f"{SERVER}: ",
             " " * 60 + "Req'd  Req'd   Elap",
             "Job ID          Username Queue    Jobname    SessID NDS TSK Memory Time  S Time",
             "--------------- -------- -------- ---------- ------ --- --- ------ ----- - -----"]
    for j in jobs:
        session = str(j.get("pid") or "--") if j["stime"] else "--"
        elapsed = _hm((j["etime"] or now) - j["stime"]) if j["stime"] else "--"
        lines.append(f"{_cut(j['id'], 15):<15} {_cut(j['owner'], 8):<8} "
                     f"{_cut(j['queue'], 8):<8} {_cut(j['name'], 10):<10} {_right(session, 6)} "
                     f"{j['nodes']:>3} {j['ncpus'] * j['nodes']:>3} {_right('--', 6)} "
                     f"{_hm(j['seconds']):>5} {j['state']} {_right(elapsed, 5)}")
    return "\n".join(lines) + "\n"


def _right(value: str, width: int) -> str:
    # PBS prints an absent value, `--`, one column short of the field's right edge.
    return f"{value:>{width - 1}} " if value == "--" else f"{value:>{width}}"


def queue_attributes(queue) -> list[tuple[str, str]]:
    """A queue's `qstat -Qf` attributes the fake enforces, in PBS's order (a ServerQueue)."""
    out = [("queue_type", "Route" if queue.routes_to else "Execution")]
    if queue.max_user_queued is not None:
        out.append(("max_queued", f"[u:PBS_GENERIC={queue.max_user_queued}]"))
    if queue.from_route_only:
        out.append(("from_route_only", "True"))
    if queue.max_nodes is not None:
        out.append(("resources_max.nodect", str(queue.max_nodes)))
    if queue.max_walltime is not None:
        out.append(("resources_max.walltime", _hms(queue.max_walltime)))
    if queue.min_nodes is not None:
        out.append(("resources_min.nodect", str(queue.min_nodes)))
    if queue.routes_to:
        out.append(("route_destinations", ",".join(queue.routes_to)))
    return out


def queues(table: dict, jobs: list[dict], full: bool) -> str:
    """`qstat -Q` (a table) or `qstat -Qf` (attributes, with state_count folded at 80 columns
    as PBS folds it) for the queues of `table` (name -> ServerQueue), in its order."""
    states = "TQHWREB"
    lines = []
    if not full:
        lines += ["Queue              Max   Tot Ena Str   Que   Run   Hld   Wat   Trn   Ext Type",
                  "---------------- ----- ----- --- --- ----- ----- ----- ----- ----- ----- ----"]
    for name, queue in table.items():
        mine = [j["state"] for j in jobs if j["queue"] == name and j["state"] != "F"]
        count = {s: mine.count(s) for s in states}
        kind = "Route" if queue.routes_to else "Execution"
        if not full:
            lines.append(f"{name:<16} {0:>5} {len(mine):>5} yes yes {count['Q']:>5} "
                         f"{count['R']:>5} {count['H']:>5} {count['W']:>5} {count['T']:>5} "
                         f"{count['E']:>5} {kind[:3]}*")
            continue
        attrs = queue_attributes(queue)
        lines += [f"Queue: {name}", f"    {attrs[0][0]} = {attrs[0][1]}",
                  f"    total_jobs = {len(mine)}",
                  "    state_count = " + " ".join(
                      f"{word}:{count[s]}" for word, s in zip(
                          ("Transit", "Queued", "Held", "Waiting", "Running", "Exiting"),
                          "TQHWRE")) + " Begun",
                  f"\t:{count['B']} "]
        lines += [f"    {k} = {v}" for k, v in attrs[1:]]
        lines += ["    enabled = True", "    started = True", ""]
    return "\n".join(lines) + "\n"
