import pytest

from jobs import cli


def test_every_command_has_help(capsys):
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out.lower()


def test_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["nope"])
    assert exit_info.value.code == 2
    assert "unknown command" in capsys.readouterr().err


def test_train_with_a_missing_data_folder_says_what_to_do(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tmp_path / 'missing'}\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "jobs.synth" in capsys.readouterr().err
