//! A small notes app on the Rust client: adds notes to the `notes` document through the running
//! agent and shows changes from your other devices live.
//!
//! ```sh
//! cargo run --example notes -- --socket /tmp/dl-a/agent.sock add "buy milk"
//! cargo run --example notes -- --socket /tmp/dl-b/agent.sock watch
//! ```

use std::path::PathBuf;

use devicelink::client::Client;
use devicelink::ipc::Event;

const DOC: &str = "notes";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (socket, rest) = match args.as_slice() {
        [flag, path, rest @ ..] if flag == "--socket" => (PathBuf::from(path), rest),
        _ => return Err("usage: notes --socket PATH (add TEXT | show | watch)".into()),
    };
    let client = Client::connect(&socket).await?;
    match rest {
        [cmd, text] if cmd == "add" => {
            client
                .doc_text_append(DOC, "body", &format!("{text}\n"))
                .await?;
            println!("saved (durable on this device, syncing to the others)");
        }
        [cmd] if cmd == "show" => println!("{}", client.doc_get(DOC).await?),
        [cmd] if cmd == "watch" => {
            let mut events = client.take_events().ok_or("events already taken")?;
            client.subscribe(DOC).await?;
            println!(
                "{}",
                client.doc_get(DOC).await?["body"].as_str().unwrap_or("")
            );
            while let Some(event) = events.recv().await {
                if let Event::Update { origin, .. } = event {
                    let body = client.doc_get(DOC).await?;
                    println!(
                        "--- change from {origin}\n{}",
                        body["body"].as_str().unwrap_or("")
                    );
                }
            }
        }
        _ => return Err("usage: notes --socket PATH (add TEXT | show | watch)".into()),
    }
    Ok(())
}
