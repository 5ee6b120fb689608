Feature: PostgreSQL: the same plans when one machine is not enough
  A resource with "engine: postgresql" and a "dsn" (or "${NAME}" to read it from
  the environment) serves plans exactly as SQLite does: a plan moves by changing
  only its resource entry. What PostgreSQL does differently is handled for
  you: a failed statement aborts the transaction until you roll back to a
  checkpoint, a row lock held elsewhere makes the plan busy, and the DSN, a
  secret, is never shown.

  Scenarios that talk to a server need CLEVERAGENTS_TEST_PG_DSN (start one with
  `eval "$(scripts/pg-test-server start)"`); without it they are skipped.

  Scenario: The example plans run on PostgreSQL with only their resource entry changed
    Given a PostgreSQL test server with a fresh schema
    When the PostgreSQL copy of the example "restock.yaml" is run
    Then the run exited with status 0
    And the server's items are apple 12, pear 7 and plum 10
    When the PostgreSQL copy of the example "sell-too-much.yaml" is run
    Then the run exited with status 1
    And the server's schema is exactly as before that run
    When the PostgreSQL copy of the example "report.yaml" is run
    Then the run exited with status 0
    And the server's table "reports" has 1 row

  Scenario: A failing statement is recovered by rolling back to a checkpoint
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv"
    When PostgreSQL plan "fix" writes "kept"
    And PostgreSQL plan "fix" takes checkpoint "before-bad"
    And PostgreSQL plan "fix" runs a statement that fails
    Then PostgreSQL plan "fix" cannot write "lost" until it rolls back
    When PostgreSQL plan "fix" rolls back to checkpoint "before-bad"
    And PostgreSQL plan "fix" writes "after"
    And PostgreSQL plan "fix" is released
    Then the server has the rows "after, kept"

  Scenario: Releasing a plan whose transaction is aborted commits nothing
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv"
    When PostgreSQL plan "doomed" writes "never"
    And PostgreSQL plan "doomed" runs a statement that fails
    Then releasing PostgreSQL plan "doomed" fails with ResourceError mentioning "nothing was committed"
    And the server has no rows

  Scenario: A retried step recovers from an aborted transaction
    Given a PostgreSQL test server with a fresh schema
    And the PostgreSQL plan file "retry.yaml":
      """
      id: retry
      resources:
        inv: {kind: database, engine: postgresql, dsn: "${CLEVERAGENTS_BDD_PG_DSN}"}
      steps:
        - {id: first, resource: inv, sql: "INSERT INTO t VALUES ('first')"}
        - id: flaky
          resource: inv
          retry: 2
          # The sequence is not rolled back: the first try divides by zero.
          sql: INSERT INTO t SELECT 'second' WHERE 1 / (nextval('tries') - 1) = 1
      """
    When "cleveragents run --json retry.yaml" is run against the server
    Then the run exited with status 0
    And the server has the rows "first, second"

  Scenario: Concurrent writers keep exactly their own rows, within the connection bound
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv" with at most 3 connections
    When 6 threads each run 10 PostgreSQL plans, every second one rolled back
    Then the server has exactly the rows of the released plans
    And no thread saw an error
    And the server never had more than 3 sessions of this process

  Scenario: A row locked by another session makes the plan busy
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv"
    And another session holds a lock on every row
    When PostgreSQL plan "waiting" tries to change every row
    Then that call failed with ResourceBusyError
    And the server has the rows "seed"

  Scenario: A plan whose session the server ended expires
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv"
    When PostgreSQL plan "idle" writes "gone"
    And the server ends the session of PostgreSQL plan "idle"
    And PostgreSQL plan "idle" tries to write "again"
    Then that call failed with CheckpointExpiredError
    And the server has no rows

  Scenario: Nothing a plan leaves on its session reaches the next plan
    Given a PostgreSQL test server with a fresh schema
    And another session holds a lock on every row
    And a handler serving the PostgreSQL resource "inv" with at most 1 connections
    When PostgreSQL plan "first" runs "SELECT set_config('lock_timeout', '0', false)"
    And PostgreSQL plan "first" runs "CREATE TEMP TABLE t (v TEXT)"
    And PostgreSQL plan "first" is released
    And PostgreSQL plan "next" tries to change every row
    Then that call failed with ResourceBusyError
    And the server has the rows "seed"

  Scenario: A COMMIT hidden after a comment ended by a carriage return is refused
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv"
    When PostgreSQL plan "sly" writes "early"
    And PostgreSQL plan "sly" tries to run a COMMIT after a comment ended by a carriage return
    Then that call failed with ResourceError
    When PostgreSQL plan "sly" is rolled back
    Then the server has no rows

  Scenario: SQL a tool sends around the guard poisons the plan
    Given a PostgreSQL test server with a fresh schema
    And a handler serving the PostgreSQL resource "inv"
    When PostgreSQL plan "sly" writes "early"
    And a tool of PostgreSQL plan "sly" commits straight through libpq
    And PostgreSQL plan "sly" tries to write "late"
    Then that call failed with ResourceError
    And releasing PostgreSQL plan "sly" fails with ResourceError mentioning "nothing was committed"
    And the server has the rows "early"

  Scenario: The DSN and its password are never shown
    Given a PostgreSQL test server with a fresh schema
    And the PostgreSQL plan file "wrong.yaml":
      """
      id: wrong
      resources:
        inv: {kind: database, engine: postgresql, dsn: "${CLEVERAGENTS_BDD_PG_DSN}"}
      steps:
        - {id: one, resource: inv, sql: "INSERT INTO t VALUES ('x')"}
      """
    And the password in the DSN is wrong
    When "cleveragents run --json wrong.yaml" is run against the server
    Then the run exited with status 1
    And its output mentions "password authentication failed"
    And its output shows neither the DSN nor its password
    When "cleveragents run wrong.yaml" is run against the server
    Then its output shows neither the DSN nor its password
    When "cleveragents stress --engine postgresql --dsn {dsn} --seconds 1" is run against the server
    Then the run exited with status 1
    And its output shows neither the DSN nor its password

  Scenario: The stress harness runs on PostgreSQL
    Given a PostgreSQL test server with a fresh schema
    When "cleveragents stress --engine postgresql --dsn {dsn} --seconds 1 --writers 2 --readers 1 --json" is run against the server
    Then the run exited with status 0
    And the stress report says the run was healthy with no errors
    And its output shows neither the DSN nor its password

  Scenario: An unset environment variable in the DSN is bad input naming it
    Given the PostgreSQL plan file "unset.yaml":
      """
      id: unset
      resources:
        inv: {kind: database, engine: postgresql, dsn: "${CLEVERAGENTS_NO_SUCH_DSN}"}
      steps:
        - {id: one, resource: inv, sql: SELECT 1}
      """
    When "cleveragents validate unset.yaml" is run
    Then the run exited with status 2
    And its output mentions "unset.yaml:3: resources.inv.dsn: environment variable 'CLEVERAGENTS_NO_SUCH_DSN' is not set"

  Scenario: SQLite settings are bad input on a PostgreSQL resource
    Given the PostgreSQL plan file "mixed.yaml":
      """
      id: mixed
      resources:
        inv:
          kind: database
          engine: postgresql
          dsn: postgresql://agent:s3cret@db.example/inventory
          journal_mode: wal
      steps:
        - {id: one, resource: inv, sql: SELECT 1}
      """
    When "cleveragents validate mixed.yaml" is run
    Then the run exited with status 2
    And its output mentions "mixed.yaml:7: resources.inv.journal_mode: unknown key"
    And its output does not mention "s3cret"
