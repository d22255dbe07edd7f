//! The `strait` binary: parse the command line, set up logging, hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = strait::cli::Cli::parse();
    strait::logging::init(&cli.log_format);
    match strait::cli::execute(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("strait: {error:#}");
            ExitCode::from(2)
        }
    }
}
