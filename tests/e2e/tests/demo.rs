//! `meshgate demo` does what the README promises: the three printed curl commands, run as
//! printed with the real curl, give the printed status codes.

use std::process::Command;

#[tokio::test]
async fn demo_curl_commands_give_the_printed_results() {
    let demo = meshgate::demo::Demo::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let text = demo.instructions();
    assert_eq!(demo.commands.len(), 3);
    for c in &demo.commands {
        // What the user sees is exactly what we run.
        assert!(text.contains(&c.shell()), "{text}");
        assert!(text.contains(&format!("-> HTTP {}", c.expect_status)), "{text}");
        let argv = c.argv.clone();
        let out = tokio::task::spawn_blocking(move || Command::new(&argv[0]).args(&argv[1..]).output())
            .await
            .unwrap()
            .expect("curl must be installed (scripts/test.sh installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: {stdout} {}",
            c.shell(),
            String::from_utf8_lossy(&out.stderr)
        );
        let last = stdout.lines().last().unwrap_or_default();
        assert_eq!(last, format!("HTTP {}", c.expect_status), "{}:\n{stdout}", c.shell());
    }
    // The shell form round-trips through a real shell too (quoting of the -w format and headers).
    let first = demo.commands[0].shell();
    let out = tokio::task::spawn_blocking(move || Command::new("sh").arg("-c").arg(first).output())
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("HTTP 200\n"));
    demo.shutdown().await;
}
