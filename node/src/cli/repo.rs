//! `flotilla pin`, `flotilla gc` and `flotilla repo stat`: what the local store keeps, and
//! how much of it is cache.

use crate::api::client::ApiClient;
use crate::cli::PinCommand;
use crate::commands::parse_cid;
use crate::output;

/// `flotilla pin add|rm|ls`.
pub async fn pin(client: &ApiClient, command: PinCommand, json: bool) -> anyhow::Result<()> {
    match command {
        PinCommand::Add { cid } => {
            let cid = parse_cid(&cid)?;
            let mut progress = output::Progress::new("fetching", None);
            client.fetch(&cid, |p| progress.set(p.bytes)).await?;
            progress.finish();
            let change = client.pin_add(&cid).await?;
            if json {
                output::json(&change);
            } else if change.changed {
                output::line(&format!("pinned {}", change.cid));
            } else {
                output::line(&format!("{} was pinned already", change.cid));
            }
        }
        PinCommand::Rm { cid } => {
            let cid = parse_cid(&cid)?;
            let change = client.pin_rm(&cid).await?;
            if json {
                output::json(&change);
            } else if change.changed {
                output::line(&format!("unpinned {}", change.cid));
            } else {
                anyhow::bail!("{} is not pinned", change.cid);
            }
        }
        PinCommand::Ls => {
            let pins = client.pin_ls().await?;
            if json {
                output::json(&pins);
            } else {
                output::pins(&pins);
            }
        }
    }
    Ok(())
}

/// `flotilla gc`.
pub async fn gc(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let report = client.gc().await?;
    if json {
        output::json(&report);
    } else {
        output::line(&format!(
            "removed {} blocks, {}",
            report.blocks,
            output::bytes(report.bytes)
        ));
    }
    Ok(())
}

/// `flotilla repo stat`.
pub async fn stat(client: &ApiClient, json: bool) -> anyhow::Result<()> {
    let stat = client.repo_stat().await?;
    if json {
        output::json(&stat);
    } else {
        output::repo_stat(&stat);
    }
    Ok(())
}
