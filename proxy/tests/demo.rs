//! `meshgate demo` does what the README promises, run as a user runs it: the real binary with
//! `--listen`, the three curl commands it prints run as printed (through a shell, with the real
//! curl), answering 200, 403 and 200, and Ctrl-C (SIGINT) ending it with exit status 0.

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn printed_curl_commands_work_as_printed_and_ctrl_c_exits_cleanly() {
    let child = Command::new(env!("CARGO_BIN_EXE_meshgate"))
        .args(["demo", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    // Everything up to the last instruction line; a reader thread keeps the wait bounded.
    let stdout = proc.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            panic!(
                "the demo did not print its instructions in time:\n{}",
                printed.join("\n")
            )
        });
        let done = line.contains("Press Ctrl-C to stop");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    // The commands exactly as printed, each after the comment that says what it shows.
    let commands: Vec<&str> = printed
        .iter()
        .map(|l| l.trim_start())
        .filter(|l| l.starts_with("curl "))
        .collect();
    assert_eq!(commands.len(), 3, "{text}");
    for (cmd, want) in commands.iter().zip(["HTTP 200", "HTTP 403", "HTTP 200"]) {
        // The comment line above the command promises the same status.
        let at = printed.iter().position(|l| l.trim_start() == *cmd).unwrap();
        assert!(
            printed[at - 1].ends_with(&format!("-> {want}")),
            "{}\n{cmd}",
            printed[at - 1]
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .expect("sh and curl must be installed (scripts/test.sh installs curl)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cmd}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.lines().last(), Some(want), "{cmd}:\n{stdout}");
    }

    // Ctrl-C: SIGINT drains and exits 0.
    let st = Command::new("kill")
        .args(["-INT", &proc.0.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the demo did not exit after SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}
