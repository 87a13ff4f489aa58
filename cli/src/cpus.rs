//! CPU sets for pinned nodes (`--cpus-per-node C`, `cpus_per_node` in the cluster
//! configuration): node K gets the K-th run of C CPUs among those this process may use,
//! so nodes that share a host never share a CPU, and placement can be judged as on
//! machines of their own. The whole node process is confined, before it starts any
//! thread (threads inherit the mask).

use anyhow::{bail, Result};

/// The CPUs this process may run on, ascending.
pub fn allowed() -> Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            bail!(
                "reading this process's CPU affinity: {}",
                std::io::Error::last_os_error()
            );
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set we own, for indices below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Every node's CPU set, or an error saying what the host can give.
pub fn layout(allowed: &[usize], nodes: u16, per_node: u32) -> Result<Vec<Vec<usize>>> {
    if per_node == 0 {
        bail!("--cpus-per-node 0: give each node at least one CPU");
    }
    let need = nodes as usize * per_node as usize;
    if need > allowed.len() {
        let most = allowed.len() / per_node as usize;
        bail!(
            "--cpus-per-node {per_node} for {nodes} nodes needs {need} CPUs; this host lets flotilla use {} (CPUs {}), so at most {most} node{} × {per_node} CPU{}",
            allowed.len(),
            list(allowed),
            if most == 1 { "" } else { "s" },
            if per_node == 1 { "" } else { "s" },
        );
    }
    Ok(allowed
        .chunks(per_node as usize)
        .take(nodes as usize)
        .map(<[usize]>::to_vec)
        .collect())
}

/// Confines this process (the calling thread, and every thread it starts from now on) to
/// `cpus`.
pub fn confine(cpus: &[usize]) -> Result<()> {
    flotilla_engine::affinity::confine_thread(cpus)
        .map_err(|e| anyhow::anyhow!("confining this node to CPUs {}: {e}", list(cpus)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_disjoint_and_refused_when_the_host_is_too_small() {
        assert_eq!(layout(&[0, 1], 2, 1).unwrap(), vec![vec![0], vec![1]]);
        assert_eq!(
            layout(&[0, 2, 4, 6], 2, 2).unwrap(),
            vec![vec![0, 2], vec![4, 6]]
        );
        let e = layout(&[0, 1], 3, 1).unwrap_err().to_string();
        assert!(
            e.contains("needs 3 CPUs") && e.contains("at most 2 nodes × 1 CPU"),
            "{e}"
        );
        assert!(layout(&[0, 1], 2, 0).is_err());
    }

    #[test]
    fn this_process_can_read_and_keep_its_affinity() {
        let cpus = allowed().unwrap();
        assert!(!cpus.is_empty());
        // Confining a scratch thread to what it already has changes nothing else.
        std::thread::spawn(move || {
            confine(&cpus).unwrap();
            assert_eq!(allowed().unwrap(), cpus);
        })
        .join()
        .unwrap();
    }
}
