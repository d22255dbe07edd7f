//! Log set-up: `tracing` to stderr, text or JSON, filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

pub fn init(format: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

/// Shows an error with its causes, `outer: cause: root cause`, for log lines and messages.
///
/// strait's errors keep their cause as `#[source]` and leave it out of their own text, so
/// that a caller that walks the chain (anyhow's `{:#}` in `main`) prints each cause once; a
/// log line or a message built with `{}` would show only the outer text, so it uses this.
/// A cause whose text the outer text already holds (an error that is `transparent`, or one
/// written before this rule) is not repeated.
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(error) = cause {
            let more = error.to_string();
            if !text.contains(&more) {
                text = format!("{text}: {more}");
            }
            cause = error.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::Chain;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read mesh file m.yaml")]
    struct Outer {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn a_chain_shows_each_cause_once() {
        let error = Outer {
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        };
        assert_eq!(
            Chain(&error).to_string(),
            "cannot read mesh file m.yaml: no such file"
        );
        let wrapped = anyhow::Error::new(error).context("loading the mesh");
        assert_eq!(
            Chain(wrapped.as_ref()).to_string(),
            "loading the mesh: cannot read mesh file m.yaml: no such file"
        );
    }
}
