@fixture.sqlite
Feature: A commit that fails part-way across two databases
  SQLite has no two-phase commit, so a plan that touched several databases is
  committed one database at a time, in the order it first used them. If one
  commit fails, the rest are rolled back, the error names the databases
  already committed, and subscribers are told the plan failed, not completed.

  Scenario: Another program reading the second database makes its commit fail
    Given a database "main.db" with an empty items table
    And a database "audit.db" with an empty items table
    And a runtime with the in-test tools plugin
    And the plan file "sell.yaml":
      """
      id: sell
      resources:
        main: {kind: database, engine: sqlite, location: main.db}
        audit:
          kind: database
          engine: sqlite
          location: audit.db
          journal_mode: delete     # a reader's shared lock blocks the commit
          busy_timeout: 200ms
      steps:
        - id: sell
          resource: main
          sql: INSERT INTO items (sku) VALUES ('apple')
        - id: log
          resource: audit
          sql: INSERT INTO items (sku) VALUES ('apple-sold')
        - id: a-reader-arrives
          tool: hold_read_lock
          with: {resource: audit}
      """
    When the runtime runs "sell.yaml"
    Then plan "sell" failed without a failed step
    And the error of plan "sell" mentions "commit failed after ['main'] were committed"
    And subscriber "recorder" was told "started, failed" for plan "sell"
    And "main.db" has the items "apple"
    And "audit.db" has no items
