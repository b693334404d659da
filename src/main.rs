//! `splitaux`: see `splitaux --help`.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::execute(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => match error.downcast_ref::<cli::ExitStatus>() {
            // The command already said what went wrong.
            Some(status) => std::process::ExitCode::from(status.0),
            None => {
                eprintln!("error: {}", one_line(&error));
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// `error` and its causes, `: `-separated on one line, as anyhow's `{:#}` prints them, except
/// that a cause the line already ends with is not repeated: an error whose message quotes its
/// own `source()` (a thiserror field named `source` shown in the message) would otherwise print
/// its cause twice.
fn one_line(error: &anyhow::Error) -> String {
    let mut chain = error.chain();
    let mut line = chain.next().map(|e| e.to_string()).unwrap_or_default();
    for cause in chain {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("settings.toml: cannot read: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[test]
    fn a_quoted_cause_is_printed_once_and_a_context_keeps_its_cause() {
        let os = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let quoting = anyhow::Error::from(Quoting { source: os() });
        assert_eq!(
            one_line(&quoting),
            "settings.toml: cannot read: no such file"
        );
        let context = anyhow::Error::from(os()).context("cannot create runs/");
        assert_eq!(one_line(&context), "cannot create runs/: no such file");
    }
}
