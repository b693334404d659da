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
                eprintln!("error: {error:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}
